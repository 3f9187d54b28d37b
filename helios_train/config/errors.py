"""`UserError`: the base of every error a user fixes themselves — a bad config key or combination, bad input
or data, a run directory in use. Each message already names the problem and the fix, so the command line prints
it as one line and exits 2, with no traceback (helios_train/__main__.py); any other exception is a bug or a
failure of the machine and keeps its traceback."""
from __future__ import annotations


class UserError(Exception):
    """Mixed into ConfigError, InputError, ShardSpecError, PrecisionError, ShapeError, the sequence-parallel
    errors and RunDirectoryLocked (each keeps its own ValueError / RuntimeError base)."""
