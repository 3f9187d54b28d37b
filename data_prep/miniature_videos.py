"""`python -m data_prep.miniature_videos`: the miniature's clips (bouncing objects whose future is known) as mp4 files
with a captions.jsonl, ready for `python -m data_prep.videos_to_shards`.

The command line of helios_train/data/miniature_world.py (its --help tells the rest)."""
from helios_train.data.miniature_world import main

if __name__ == "__main__":
    main()
