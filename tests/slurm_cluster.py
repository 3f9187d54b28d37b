"""A one-node SLURM cluster on this host for the tests: munged, slurmctld and slurmd from Debian's slurm-wlm
and munge packages (`.ci/run` installs them), each started with its own files under one folder and free ports,
and stopped by pid. Clients (sbatch, scancel, scontrol, squeue) find it through SLURM_CONF in `env`."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def available() -> str | None:
    """None when every daemon and client is installed, else what is missing."""
    missing = [p for p in (*DAEMONS, "sbatch", "scontrol", "scancel", "squeue") if shutil.which(p) is None
               and not Path(f"/usr/sbin/{p}").exists()]
    return f"not installed: {', '.join(missing)} (Debian: apt-get install slurm-wlm munge)" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.host = socket.gethostname()
        self.cpus = cpus or os.cpu_count() or 2
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "socket"
        self.pids: dict[str, int] = {}

    @property
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> "SlurmCluster":
        munge = self.root / "munge"
        for d in (munge, self.root / "state", self.root / "spool"):
            d.mkdir(parents=True, exist_ok=True)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        subprocess.run([_binary("munged"), "--force", "-S", str(self.munge_socket), f"--key-file={key}",
                        f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                        f"--seed-file={munge / 'seed'}"], check=True, capture_output=True, text=True)
        self.pids["munged"] = int((munge / "munged.pid").read_text())
        self.conf.write_text(self._config())
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([_binary(daemon), "-f", str(self.conf)], check=True, env=self.env, capture_output=True,
                           text=True)
            self.pids[daemon] = int(self._wait(lambda d=daemon: (self.root / f"{d}.pid").is_file() and
                                               (self.root / f"{d}.pid").read_text().strip(), timeout, f"{daemon}.pid"))
        self._wait(lambda: self.scontrol("show", "node", self.host).find("State=IDLE") >= 0, timeout, "an idle node")
        return self

    def _config(self) -> str:
        r = self.root
        return "\n".join([
            "ClusterName=heliosci", f"SlurmctldHost={self.host}", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            # cred_expire: a requeued job starts only once its old credentials expired (default 120 s: 3 min a requeue)
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket},cred_expire=5", "CredType=cred/munge",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            # no cgroups in a container: track a job's processes by parentage
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none",
            "SchedulerType=sched/backfill", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "JobCompType=jobcomp/none",
            "SlurmdParameters=config_overrides", "KillWait=30", "MinJobAge=3600",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory=4000 State=UNKNOWN",
            f"PartitionName=ci Nodes={self.host} Default=YES MaxTime=INFINITE State=UP", ""])

    @staticmethod
    def _wait(ready, timeout: float, what: str):
        t0 = time.time()
        while time.time() - t0 < timeout:
            value = ready()
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"SLURM: no {what} after {timeout:.0f} s")

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True).stdout

    def submit(self, *args: str, cwd: Path, env: dict) -> int:
        out = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env={**env, "SLURM_CONF": str(self.conf)},
                             capture_output=True, text=True, check=True).stdout
        return int(out.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        fields = {}
        for token in self.scontrol("show", "job", str(job_id)).split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields[k] = v
        return fields

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
        for daemon in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(daemon, None)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
