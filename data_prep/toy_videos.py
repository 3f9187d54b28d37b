"""`python -m data_prep.toy_videos`: synthetic toy videos: moving, colour-changing shapes with captions that describe them.

The command line of helios_train/data/toy_videos.py (its --help tells the rest)."""
from helios_train.data.toy_videos import main

if __name__ == "__main__":
    main()
