"""`python -m data_prep.videos_to_shards`: folder of mp4s + captions → raw WebDataset shards (mp4 + json), filtered, cropped and resized.

The command line of helios_train/data/videos_to_shards.py (its --help tells the rest)."""
from helios_train.data.videos_to_shards import main

if __name__ == "__main__":
    main()
