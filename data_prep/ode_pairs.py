"""`python -m data_prep.ode_pairs`: ODE pairs of a Mid teacher for the Distilled stage's ODE-regression phase.

The command line of helios_train/sampling/ode_pair_capture.py (its --help tells the rest)."""
from helios_train.sampling.ode_pair_capture import main

if __name__ == "__main__":
    main()
