"""`python -m data_prep.encode_latents`: raw mp4 shards → latent shards (VAE latents per 33-frame chunk + UMT5 prompt embedding).

The command line of helios_train/data/encode_latents.py (its --help tells the rest)."""
from helios_train.data.encode_latents import main

if __name__ == "__main__":
    main()
