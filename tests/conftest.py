"""Shared fixtures: tiny random Llama folders and a launcher for real 2-rank torchrun jobs on gloo."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def torchrun_cmd(args: list[str], nproc: int = 2) -> list[str]:
    return [TORCHRUN, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args]


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 600, check: bool = True,
                 **env: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N ARGS`` with DS_ACCELERATOR=cpu; output captured, failure shown."""
    proc = subprocess.run(torchrun_cmd(args, nproc), cwd=REPO, env=rank_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from sande_dist.models.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_untied_model(tmp_path_factory) -> Path:
    from sande_dist.models.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny_untied", tie_word_embeddings=False, seed=1)
