"""Process groups from any launcher: torchrun, the deepspeed launcher, srun, or none.

Each launcher names rank, world size and local rank differently; ``detect_launch``
reads them into one ``DistInfo`` and exports the torch ``env://`` variables, so the
rest of the code sees torchrun's view everywhere. CUDA uses nccl; CPU uses gloo with
DeepSpeed's CPU accelerator (``DS_ACCELERATOR=cpu``).
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # torchrun | deepspeed | slurm | single
    backend: str  # nccl | gloo

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """Prefix for log lines: every line names its rank."""
        return f"[rank {self.rank}/{self.world_size}]"


def rank() -> int:
    """This process's global rank (0 outside a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    """Wait for every rank (nothing outside a process group)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity mask where the OS has one), in order."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as ``gpu[03-05,09],cpu1`` (no scontrol needed)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def own_op_builds() -> str:
    """Build DeepSpeed's JIT ops (CPU Adam, the CPU comm op, ...) in this Python environment's own folder,
    unless TORCH_EXTENSIONS_DIR says otherwise; returns the folder.

    torch's default, ~/.cache/torch_extensions, is shared by every environment of the user, and an op's
    build file names the DeepSpeed it was built from: two checkouts with their own venvs (a CI clone beside
    a working copy) rebuild each other's op on every switch, under a file lock that a process killed
    mid-build leaves behind, and every later start then sleeps on it. `make setup` prebuilds into the
    same folder."""
    return os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))


def use_cpu_accelerator_if_no_cuda() -> bool:
    """DeepSpeed's environment, set before importing deepspeed: the ops' build folder (``own_op_builds``),
    and its CPU accelerator when there is no GPU."""
    import torch

    own_op_builds()
    if torch.cuda.is_available():
        return False
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return True


def launch_world_size() -> int:
    """The rank count the launcher set up for this process (before any process group exists)."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    return int(env.get("SLURM_NTASKS", "1"))


def detect_launch(local_rank_arg: Optional[int] = None) -> DistInfo:
    """Read rank/world/local rank from the launcher's environment and export torch's env:// names."""
    import torch

    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        # torchrun and the deepspeed launcher both export these; the latter also passes --local_rank.
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed"
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", local_rank_arg if local_rank_arg is not None else 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        launcher = "slurm"
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
        # All tasks of a job agree on this port without talking to each other.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        launcher, rank, world, local = "single", 0, 1, 0
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"] = str(rank), str(world), str(local)
    env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", str(world)).split("(")[0])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return DistInfo(rank, world, local, launcher, backend)


def die_with_launcher() -> None:
    """Make this rank die when its launcher does (Linux).

    torchrun starts each rank in a session of its own, so killing a run's process group
    (SIGKILL, a closed terminal) kills torchrun but not the ranks: they would go on
    training, and a rerun would share the stage folder with them.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the launcher died before the call took effect
        os._exit(1)


def init_distributed(local_rank_arg: Optional[int] = None, timeout_minutes: float = 60.0) -> DistInfo:
    """Initialise torch.distributed and DeepSpeed's comm layer for this process.

    ``timeout_minutes`` bounds every collective, among them the barriers that wait on rank 0
    alone (an export, a checkpoint rotation): long enough for a 70B model's.
    """
    use_cpu_accelerator_if_no_cuda()
    info = detect_launch(local_rank_arg)
    if info.launcher == "torchrun":
        die_with_launcher()
    # DeepSpeed's ZeRO calls torch collectives that torch 2.13 deprecates: one warning per call.
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.",
                            category=FutureWarning)
    import torch
    import torch.distributed as dist

    if info.backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=info.backend, rank=info.rank, world_size=info.world_size,
                                timeout=timedelta(minutes=timeout_minutes))
    import deepspeed

    deepspeed.init_distributed(dist_backend=info.backend, timeout=timedelta(minutes=timeout_minutes))
    return info


def teardown(ok: bool = True) -> None:
    """barrier + destroy_process_group (gloo may abort at exit otherwise).

    After a failure the other ranks may never reach a barrier, so only destroy.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def distributed(local_rank_arg: Optional[int] = None, timeout_minutes: float = 60.0) -> Iterator[DistInfo]:
    """A process group for the body: created here and torn down after, or, when one exists already
    (several stages in one process, ``sande batch``), that one, left for its owner to tear down."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield detect_launch(local_rank_arg)
        return
    info = init_distributed(local_rank_arg, timeout_minutes)
    ok = False
    try:
        yield info
        ok = True
    finally:
        teardown(ok)
