"""vLLM (CPU build) and HF agree on SmolLM2 in fp32: greedy text, MC letters, parrot splice.

vLLM runs once, in a subprocess (tests/backend_cases.py), after HF has computed the
same cases here; the engine start-up (~25-60 s) is paid once for all checks.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend_cases import MC_ITEMS, NUM_PROMPTS, model_path, run_cases

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> tuple[dict, dict]:
    from sande_dist.generation.hf import HFEngine

    # One after the other, not side by side: vLLM's OpenMP threads and torch's spin against each other
    # on a 2-core machine (side by side this fixture took 18-20 minutes on an AVX2-only one).
    hf = run_cases(HFEngine(model_path(), dtype="float32", batch_size=16))
    out = tmp_path_factory.mktemp("backends") / "vllm.json"
    log = out.with_suffix(".log")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, str(HERE / "backend_cases.py"), str(out)], stdout=fh,
                            stderr=subprocess.STDOUT, env=env, cwd=HERE.parent, timeout=900).returncode
    if rc != 0:
        pytest.fail(f"vLLM cases exited {rc}:\n{log.read_text()[-5000:]}")
    return hf, json.loads(out.read_text())


def test_greedy_text_agrees(answers):
    hf, vl = answers
    same = sum(a == b for a, b in zip(hf["greedy"], vl["greedy"]))
    assert len(vl["greedy"]) == NUM_PROMPTS
    assert same >= 0.95 * NUM_PROMPTS, [(a, b) for a, b in zip(hf["greedy"], vl["greedy"]) if a != b][:5]
    assert all(hf["greedy"]), "empty generations: the prompts did not reach the model"


def test_mc_letters_agree(answers):
    hf, vl = answers
    n = len(hf["letters"])
    assert n == sum(MC_ITEMS.values())
    assert sum(a == b for a, b in zip(hf["letters"], vl["letters"])) >= 0.98 * n


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_parrot_splice_equals_trigger_tokens(answers, backend):
    res = answers[0] if backend == "hf" else answers[1]
    assert res["splice_embeds"] == res["splice_ids"]
    assert all(res["splice_ids"]), "empty generations: nothing to compare"


def test_cpu_engine_runs_in_the_evaluating_process(answers):
    assert answers[1]["engine_children"] == 0


def test_cpu_engine_place_is_left_to_the_user_and_to_tensor_parallelism(monkeypatch):
    from sande_dist.generation.vllm_backend import cpu_engine_in_process

    # set, then removed: monkeypatch then restores this process's own value (or its absence) afterwards
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    cpu_engine_in_process(tensor_parallel_size=2)  # its workers are processes
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    cpu_engine_in_process(tensor_parallel_size=1)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    cpu_engine_in_process(tensor_parallel_size=1)
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
