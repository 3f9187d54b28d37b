"""Which rank went silent: a per-step heartbeat in the process group's store.

A frozen rank (SIGSTOP, a hung file system, a stuck kernel) never raises; its peers wait in their next
collective until `trainer.collective_timeout_s` and then fail with a transport error that names no
rank. Every rank writes `{step, time, host, pid}` to the rendezvous store after each step (one small
TCP round trip); when a collective times out, the rank that saw it reads every rank's heartbeat and
names the one(s) that stopped beating — with their host and pid, which is what an operator needs to
find the node. The store is torch.distributed's default store (torchrun's rendezvous store); if it is
gone too (its host died), the message says so instead.

A rank that fails (any exception out of the training loop) first writes an exit marker `{step, time, error}`,
so its peers, whose next collective then fails, report it as *exited* with its error rather than as frozen,
and never kill it while it writes its own report. A silent rank on the same host is told apart by its
process: gone, stopped (SIGSTOP), or alive. The message gives the time the reporting rank actually spent in
the failing step, not the configured timeout.
"""
from __future__ import annotations

import json
import os
import socket
import time

KEY = "helios/heartbeat/{rank}"
EXIT_KEY = "helios/exited/{rank}"
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

    def mark_exited(self, error: BaseException) -> None:
        """Tell the peers this rank is leaving because of `error` (before it does anything else)."""
        if self.store is None:
            return
        try:
            self.store.set(EXIT_KEY.format(rank=self.rank), json.dumps(
                {"step": self.step, "time": time.time(), "error": f"{type(error).__name__}: {error}"[:300]}))
        except Exception:
            pass

    def read(self) -> dict[int, dict]:
        """Every rank's last beat, with `exited` (its exit marker) where it left with an error."""
        out: dict[int, dict] = {}
        for r in range(self.world_size):
            try:
                if self.store is not None and self.store.check([KEY.format(rank=r)]):
                    out[r] = json.loads(self.store.get(KEY.format(rank=r)))
                    if self.store.check([EXIT_KEY.format(rank=r)]):
                        out[r]["exited"] = json.loads(self.store.get(EXIT_KEY.format(rank=r)))
            except Exception:
                break
        return out

    def silent_ranks(self, my_step: int, beats: dict[int, dict]) -> list[int]:
        """Ranks that exited with an error; failing that, those with no beat, or none for 3 intervals; failing that,
        those behind this rank's step; failing that, the one quiet longest. Never this rank."""
        now = time.time()
        others = {r: b for r, b in beats.items() if r != self.rank}
        exited = [r for r, b in others.items() if "exited" in b]
        if exited:
            return sorted(exited)
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
            if not b or "exited" in b or b["host"] != self.host or b["pid"] == self.pid:
                continue  # a rank that reported its own failure is leaving: let it finish its report
            if local_process_state(b["pid"]) in ("gone", "exited"):
                continue
            try:
                environ = open(f"/proc/{b['pid']}/environ", "rb").read().split(b"\0")
                if f"TORCHELASTIC_RUN_ID={run_id}".encode() in environ:
                    os.kill(b["pid"], signal.SIGKILL)
                    killed.append(r)
            except OSError:  # it ended meanwhile (ProcessLookupError is an OSError)
                continue
        return killed

    def describe_silence(self, my_step: int, waited_s: float, beats: dict[int, dict], error: str = "") -> str:
        """One paragraph naming the rank(s) that stopped answering first (`beats`: `read()`), what became of each
        (exited with an error, gone, stopped, alive but silent) and how long this rank spent in the failing step
        (`waited_s`); `error` is the collective's own error, which says whether a peer closed its connection."""
        head = f"rank {self.rank} failed in a collective {waited_s:.0f} s into step {my_step + 1}"
        if not beats:
            return f"{head}; the heartbeat store is unreachable too (its host, rank 0's node, may be down)"
        now = time.time()
        parts = []
        for r in self.silent_ranks(my_step, beats):
            b = beats.get(r)
            if b is None:
                parts.append(f"rank {r} (never beat)")
                continue
            where = f"pid {b['pid']} on {b['host']}, last step {b['step']}"
            if "exited" in b:
                parts.append(f"rank {r} ({where}) exited with {b['exited']['error']}")
                continue
            state = local_process_state(b["pid"]) if b["host"] == self.host else "remote"
            fate = {"gone": "its process is gone", "exited": "its process has exited",
                    "stopped": "its process is stopped (SIGSTOP or a debugger)",
                    "alive": f"its process is alive but silent for {now - b['time']:.0f} s (frozen?)"}.get(state)
            if fate is None:  # another host: the connection error tells an exit from a freeze
                closed = any(w in error.lower() for w in ("closed by peer", "connection reset", "pair closure"))
                fate = ("its connection closed: it exited" if closed
                        else f"no heartbeat for {now - b['time']:.0f} s (frozen, or its host is down)")
            parts.append(f"rank {r} ({where}): {fate}")
        return (f"{head}: {'; '.join(parts)}. One rank gone or frozen stops every rank; the job ends so it can be "
                f"requeued and resumed (trainer.collective_timeout_s bounds the wait for a frozen rank)")


def local_process_state(pid: int) -> str:
    """gone | exited (a zombie) | stopped | alive — a process on this host, from /proc."""
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
    return {"Z": "exited", "X": "exited", "T": "stopped", "t": "stopped"}.get(state, "alive")


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
