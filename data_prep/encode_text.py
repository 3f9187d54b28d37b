"""`python -m data_prep.encode_text`: text prompts → prompt-embedding shards (official tools/offload_data/get_text-embedding.py), for text-only data.

The command line of helios_train/data/encode_text.py (its --help tells the rest)."""
from helios_train.data.encode_text import main

if __name__ == "__main__":
    main()
