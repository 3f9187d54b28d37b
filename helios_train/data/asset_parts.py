"""Built-once assets (the toy's, the miniature's): a part of an asset folder is built by one process and marked
complete, the others wait on the folder's lock and reuse it; a part without its marker (a killed build) is built
again."""
from __future__ import annotations

import contextlib
import fcntl
import time
from pathlib import Path

MARKER = "COMPLETE"


def part(path: Path, label: str, build) -> None:
    """Build one part unless its COMPLETE marker says it is there."""
    if (path / MARKER).is_file():
        return
    t0 = time.perf_counter()
    build()
    (path / MARKER).write_text("ok")
    print(f"[helios-train] built {label} in {time.perf_counter() - t0:.1f}s -> {path}", flush=True)


@contextlib.contextmanager
def locked_root(root: Path):
    """Hold `root/.lock` exclusively: one process builds, the others wait and then reuse what it built."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
