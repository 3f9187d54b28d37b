"""Files replaced whole or not at all: write a sibling temp file, fsync it, rename it over the target.

A kill at any instant leaves the old file or the new one, never half of one. Standard library only: the
entry point's early signal handler (process_guard.py) uses it while torch may still be importing.
"""
from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
