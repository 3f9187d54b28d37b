"""`python -m data_prep.toy_checkpoint`: build a tiny random Helios checkpoint in diffusers layout, so the 14B loading code runs on a laptop.

The command line of helios_train/data/toy_checkpoint.py (its --help tells the rest)."""
from helios_train.data.toy_checkpoint import main

if __name__ == "__main__":
    main()
