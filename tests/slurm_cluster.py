"""A real, throw-away Slurm cluster on this host for tests: munged, slurmctld and two slurmd.

Debian's slurm-wlm is built with multiple-slurmd support, so two slurmd
processes on one host act as nodes n1 and n2. Everything (key, config, state,
logs, sockets) lives in one temporary folder; daemons are stopped by the PIDs
recorded when they were started. Needs root (SlurmUser=root) and the packages
from `make slurm-deps`.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")


def unavailable_reason() -> Optional[str]:
    """Why a local cluster cannot start here, or None when it can."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)} missing); run `make slurm-deps` as root"
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root (SlurmUser=root)"
    return None


def free_ports(count: int) -> list[int]:
    """Ports free right now (held open together so they differ)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env` holds SLURM_CONF for the clients."""

    def __init__(self, root: Path, nodes: tuple[str, ...] = ("n1", "n2"), cpus: int = 2):
        self.root = Path(root)
        self.nodes = nodes
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.socket = self.root / "munge.sock"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_conf(self) -> None:
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname()
        r = self.root
        lines = [
            "ClusterName=sandetest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire=10: a requeued job may start again ~10 s after it ended (default 120).
            f"AuthInfo=socket={self.socket},cred_expire=10",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=5,bf_interval=5",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "MailProg=/bin/true",
            "MpiDefault=none",
            "JobRequeue=1",
            "KillWait=5",
            "InactiveLimit=0",
            "MinJobAge=300",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/slurmctld.log",
            f"SlurmdLogFile={r}/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"PlugStackConfig={r}/plugstack.conf",
        ]
        # The node names do not resolve: NodeAddr carries the address jobs must use.
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} RealMemory=4000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (r / "plugstack.conf").write_text("")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def start(self, timeout: float = 30.0) -> "SlurmCluster":
        r = self.root
        for sub in ["state", *(f"spool/{n}" for n in self.nodes)]:
            (r / sub).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        key = r / "munge.key"
        subprocess.run([_exe("mungekey"), "--create", "--force", f"--keyfile={key}"], check=True, capture_output=True)
        key.chmod(0o400)
        self._spawn("munged", [_exe("munged"), "-F", "--force", f"--socket={self.socket}", f"--key-file={key}",
                               f"--pid-file={r}/munged.pid", f"--log-file={r}/munged.log",
                               f"--seed-file={r}/munged.seed"])
        self._wait(lambda: self.socket.exists(), timeout, "munged socket")
        self._spawn("slurmctld", [_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", [_exe("slurmd"), "-D", "-f", str(self.conf), "-N", n])
        self._wait(self._nodes_idle, timeout, "nodes idle")
        return self

    def _nodes_idle(self) -> bool:
        out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}; "
                                       f"see {self.root}/{name}.stdout and the *.log files")
            if ready():
                return
            time.sleep(0.3)
        raise TimeoutError(f"local Slurm: {what} not ready after {timeout:.0f}s; logs in {self.root}")

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, check=check, timeout=30)

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = "UNKNOWN"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} in state {state}, not {sorted(states)}, after {timeout:.0f}s; "
                           f"logs in {self.root}")

    def stop(self) -> None:
        """Cancel all jobs, then stop the daemons (slurmd, slurmctld, munged) by their PIDs."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "--user=root", check=False)
            time.sleep(1)
        order = [n for n in self.procs if n.startswith("slurmd-")] + ["slurmctld", "munged"]
        for name in order:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()
