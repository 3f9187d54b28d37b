"""`python -m data_prep.latent_stats`: per-channel mean / std of latent shards (official tools/others/get_mean_std_size9.py), streamed (sum, sum²).

The command line of helios_train/data/latent_stats.py (its --help tells the rest)."""
from helios_train.data.latent_stats import main

if __name__ == "__main__":
    main()
