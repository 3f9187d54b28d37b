"""Which rank went silent: a per-step heartbeat in the process group's store.

A frozen rank (SIGSTOP, a hung file system, a stuck kernel) never raises; its peers wait in their next
collective until `trainer.collective_timeout_s` and then fail with a transport error that names no
rank. Every rank writes `{step, time, host, pid}` to the rendezvous store after each step (one small
TCP round trip); when a collective times out, the rank that saw it reads every rank's heartbeat and
names the one(s) that stopped beating — with their host and pid, which is what an operator needs to
find the node. The store is torch.distributed's default store (torchrun's rendezvous store); if it is
gone too (its host died), the message says so instead.
"""
from __future__ import annotations

import json
import os
import socket
import time

KEY = "helios/heartbeat/{rank}"
TIMEOUT_WORDS = ("timed out", "timeout", "pair closure", "connection closed by peer", "connection reset", "gloo",
                 "nccl")


def is_collective_timeout(exn: BaseException) -> bool:
    """A collective that failed because a peer stopped answering or went away (gloo's transport errors, which
    name their source file; NCCL's watchdog)."""
    import torch.distributed as dist

    text = str(exn).lower()
    backend_error = getattr(dist, "DistBackendError", ())
    return isinstance(exn, backend_error) or (isinstance(exn, RuntimeError) and any(w in text for w in TIMEOUT_WORDS))


def _store():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):  # a group built without a store
        return None


class Heartbeat:
    """Each rank's `{step, time, host, pid}` in the store: written at every step and by a daemon thread every
    `interval_s` (a tenth of the collective timeout, at least 0.5 s). The thread stops with its process when
    that is frozen (SIGSTOP stops every thread; so does a kernel-level hang), while a rank merely waiting in a
    collective keeps beating (torch releases the GIL there): the silent rank is the one whose beats stopped."""

    def __init__(self, rank: int, world_size: int, interval_s: float = 60.0):
        self.rank, self.world_size, self.interval_s = rank, world_size, max(0.5, interval_s)
        self.store = _store() if world_size > 1 else None
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.step = 0
        self._stop = None
        if self.store is not None:
            import threading

            self._stop = threading.Event()
            threading.Thread(target=self._beat_periodically, name="helios-heartbeat", daemon=True).start()

    def _beat_periodically(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat(self.step)

    def beat(self, step: int) -> None:
        self.step = step
        if self.store is None:
            return
        try:
            self.store.set(KEY.format(rank=self.rank), json.dumps(
                {"step": step, "time": time.time(), "host": self.host, "pid": self.pid}))
        except Exception:  # the store's host is gone: the collectives will say so
            self.store = None

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def read(self) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for r in range(self.world_size):
            key = KEY.format(rank=r)
            try:
                if self.store is not None and self.store.check([key]):
                    out[r] = json.loads(self.store.get(key))
            except Exception:
                break
        return out

    def silent_ranks(self, my_step: int, beats: dict[int, dict]) -> list[int]:
        """Ranks with no beat, or none for 3 intervals; failing that, those behind this rank's step; failing
        that, the one quiet longest. Never this rank."""
        now = time.time()
        others = {r: b for r, b in beats.items() if r != self.rank}
        missing = [r for r in range(self.world_size) if r != self.rank and r not in beats]
        stale = [r for r, b in others.items() if now - b["time"] > 3 * self.interval_s]
        if stale or missing:
            return sorted(stale + missing)
        behind = [r for r, b in others.items() if b["step"] < my_step]
        if behind:
            return sorted(behind)
        return [min(others, key=lambda r: others[r]["time"])] if others else []

    def stop_silent_local_ranks(self, my_step: int, beats: dict[int, dict]) -> list[int]:
        """SIGKILL the silent ranks that run on this host in this same job (checked through their torchrun run
        id), so the job ends now instead of after the launcher's 30 s grace for a process that cannot handle
        SIGTERM (a stopped one); ranks on other hosts are ended by their own node's launcher."""
        import signal

        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        if not run_id:
            return []
        killed = []
        for r in self.silent_ranks(my_step, beats):
            b = beats.get(r)
            if not b or b["host"] != self.host or b["pid"] == self.pid:
                continue
            try:
                environ = open(f"/proc/{b['pid']}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"TORCHELASTIC_RUN_ID={run_id}".encode() in environ:
                os.kill(b["pid"], signal.SIGKILL)
                killed.append(r)
        return killed

    def describe_silence(self, my_step: int, waited_s: float, beats: dict[int, dict]) -> str:
        """One paragraph naming the rank(s) whose heartbeat stopped first (`beats`: `read()`)."""
        if not beats:
            return (f"rank {self.rank} waited {waited_s:.0f} s in a collective at step {my_step}; the heartbeat "
                    f"store is unreachable too (its host, rank 0's node, may be down)")
        now = time.time()
        silent = self.silent_ranks(my_step, beats)
        parts = [f"rank {r}" + (f" (pid {beats[r]['pid']} on {beats[r]['host']}, last step {beats[r]['step']}, "
                                f"{now - beats[r]['time']:.0f} s ago)" if r in beats else " (never beat)")
                 for r in silent]
        return (f"rank {self.rank} waited {waited_s:.0f} s (trainer.collective_timeout_s) in a collective at step "
                f"{my_step}: silent {', '.join(parts)}. A frozen or dead process there (SIGSTOP, a hung file system, "
                f"an out-of-memory kill) stops every rank; the job ends so it can be requeued and resumed")


class SilentRank(RuntimeError):
    """A collective timed out; the message names the rank(s) whose heartbeat stopped."""


def wait_for_rank0(backend, key: str, timeout_s: float) -> None:
    """Rank 0 marks `key` done; every other rank waits for it in the store (not in a collective, so the
    wait is bounded by `timeout_s`, not by trainer.collective_timeout_s)."""
    import datetime

    if backend.world_size == 1:
        return
    store = _store()
    if store is None:
        return  # no store to wait in: the barrier after this waits instead
    if backend.is_main:
        store.set(key, "done")
        return
    try:
        store.wait([key], datetime.timedelta(seconds=timeout_s))
    except Exception as exn:
        raise SilentRank(f"rank {backend.rank} waited {timeout_s:.0f} s (validation.wait_timeout_s) for rank 0 to "
                         f"finish {key}: rank 0 is stuck or gone") from exn
