"""One trainer per run directory: an advisory lock that rank 0 holds for the whole run.

Two trainers on one directory (a requeued job beside one that never died, a command run twice) would
interleave `metrics.jsonl` and overwrite each other's checkpoints. Rank 0 takes `<run>/.lock` with
`flock` before it writes anything and keeps the file open until the process ends; the kernel drops
the lock when the holder dies however it dies (SIGKILL, OOM, node crash on NFS once the client's
lease ends), so a crashed run never blocks the next one. The file holds the holder's host, pid and
start time: a second trainer stops naming them, and a lock taken over from a holder that is gone
says so. flock is coherent across nodes on NFS (Linux ≥ 2.6.12) and on Lustre mounted with `-o flock`;
on a file system without it (`-o noflock`: ENOSYS) the run continues with a warning that it is unlocked.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from helios_train.config.errors import UserError

log = logging.getLogger(__name__)
LOCK_NAME = ".lock"


class RunDirectoryLocked(UserError, RuntimeError):
    """Another live trainer holds this run directory."""


def _holder_text(info: dict) -> str:
    if not info:
        return "a process that left no details"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} (started {started}, command: {info.get('command', '?')})"


class RunLock:
    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exn:
            if exn.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = cls._read(fd)
                os.close(fd)
                raise RunDirectoryLocked(
                    f"run directory {run_dir} is in use by another trainer: {_holder_text(holder)}. Stop that one, "
                    f"or give this run another run_name") from None
            if exn.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK):
                os.close(fd)
                log.warning("%s: this file system has no flock (%s); the run directory is not locked against a "
                            "second trainer", path, os.strerror(exn.errno))
                return cls(path, None)
            os.close(fd)
            raise
        previous = cls._read(fd)
        if previous and previous.get("pid") != os.getpid():
            log.info("run directory lock taken over from %s, which is gone", _holder_text(previous))
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        os.fsync(fd)
        return cls(path, fd)

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return {}

    def release(self) -> None:
        """Give the directory back (end of run; in one process, before the next trainer on it)."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)  # no details of a holder that has finished
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None
