"""Shared fixtures: tiny random Llama folders and a launcher for real 2-rank torchrun jobs on gloo.

Also how the suite shares a machine between pytest-xdist workers (``make test`` runs ``-n auto``).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from sande_dist.distributed.process_group import free_port, usable_cores

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# CI sets this (.ci/run): a test whose real component (Slurm, vLLM's CPU build) is missing fails there
# instead of skipping, so a broken install cannot pass as green. Elsewhere (no root, no Slurm) it skips.
STRICT = os.environ.get("SANDE_TEST_STRICT") == "1"


def _share_cores_between_workers() -> None:
    """Under pytest-xdist, give this worker its share of the cores for what it computes in-process and
    for what its subprocesses inherit: torch's threads, OMP_NUM_THREADS, and vLLM's CPU binding (which
    otherwise takes every core). Two workers each spinning OpenMP threads on every core of a small
    machine run many times slower than one after the other. Processes still float between cores: a
    worker's 2-rank job uses both when the other worker waits."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    if not worker:
        return
    import torch

    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = usable_cores()
    mine = cores[int(worker[2:]) % len(cores)::count] or cores
    os.environ["OMP_NUM_THREADS"] = str(len(mine))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))
    os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    torch.set_num_threads(len(mine))


_share_cores_between_workers()


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


def load_script(path: Path, name: Optional[str] = None):
    """A script outside the package (eval/, benchmarks/) imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


# Modules that take minutes, longest first (seconds summed over their tests under two xdist workers on
# 2 cores, --durations): a worker that starts them early is not left running one alone at the end.
# xdist sends the groups (below) first, largest first; these order the rest.
SLOW_MODULES = ["test_shipped_configs", "test_generation_backends", "test_training_resume", "test_researcher_tools",
                "test_pipeline_run", "test_rounds_and_scan", "test_removal", "test_precision", "test_slurm",
                "test_eval_stage", "test_training_core", "test_eval_lm_eval"]


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Slow modules first; and a module's tests that share a module-scoped fixture (a trained model, an
    engine's answers, a Slurm cluster) stay on one xdist worker (``--dist loadgroup``), so that fixture
    is built once."""
    rank = {name: i for i, name in enumerate(SLOW_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: file order within
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else []
        if any(d[-1].scope in ("module", "class") for d in defs if d):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
