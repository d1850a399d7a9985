"""The 7B and 70B configs run end to end with only the model and the data swapped for small local ones.

Every other setting stays as shipped: the DeepSpeed preset (ZeRO-3; ZeRO-3 with optimizer and
parameter offload, i.e. DeepSpeed's CPU Adam), bf16, gradient checkpointing, the prompt format,
the removal recipe (rounds, parrot size and positions), vLLM evaluation in bf16. What a CPU cannot
run is replaced by its closest setting, as the README says: DeepSpeed's bf16 engine mode becomes
bf16 autocast over fp32 weights, and vLLM's data/tensor parallelism across 8 GPUs becomes one engine.
The model is a tiny Llama with a SentencePiece-style tokenizer (Llama-2 style); data are a few dozen
rows, training a few steps, evaluation a few prompts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require, vllm_missing
from sande_dist.config import load_config
from sande_dist.machine import cpu_has_native_bf16
from sande_dist.registry import KINDS

ROOT = Path(__file__).resolve().parents[1]
# Only these change: the model and data, their sizes, and what cannot exist on one CPU.
SMALL = ["data.train=alpaca-demo", "data.num_rows=24", "training.num_rows=24", "training.max_steps=2", "eval.num_prompts=4",
         "eval.utility_limit=4", "eval.data_parallel_size=1", "eval.tensor_parallel_size=1"]
# The two configs differ in their training (ZeRO-3 vs ZeRO-3 offload, lr, accumulation) and in vLLM's
# parallel sizes, which one CPU replaces by one engine either way: so the 70B run evaluates only the
# cleaned model (its parrot included), and the 7B run the backdoored one (no parrot) too. OSFT's model is
# evaluated by the same code as the backdoored one, in tests/test_pipeline_run.py.
EVALUATIONS = {"llama2-7b-alpaca": ["evaluate_backdoored", "evaluate_sande"],
               "llama2-70b-alpaca": ["evaluate_sande"]}
TRAINING = ["inject", "osft", "simulate", "eliminate"]


@pytest.mark.parametrize("name", ["llama2-7b-alpaca", "llama2-70b-alpaca"])
def test_shipped_config_runs_end_to_end(name, tiny_sp_llama, tmp_path):
    require(vllm_missing())
    shipped = load_config(ROOT / "configs" / f"{name}.yaml")
    run = tmp_path / "run"
    sets = [x for s in [f"model.path={tiny_sp_llama}", *SMALL] for x in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "sande_dist.cli", "run", str(ROOT / "configs" / f"{name}.yaml"),
                           "--run-dir", str(run), "--nproc", "2", "--stages", ",".join(TRAINING + EVALUATIONS[name]),
                           *sets],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    used = load_config(run / "config.yaml")
    # every setting but the swapped ones is as shipped
    for section in ("attack", "removal"):
        assert getattr(used, section) == getattr(shipped, section), section
    assert used.data.prompt_format == shipped.data.prompt_format and used.data.max_length == shipped.data.max_length

    stages = [d.name for d in run.iterdir() if (d / "stage.json").exists()]
    sande = [s for s in stages if s.startswith(("simulate", "eliminate"))]
    rounds, extra = shipped.removal.rounds, len(shipped.removal.extra_parrots)
    assert len([s for s in sande if s.startswith("eliminate")]) == rounds
    assert len([s for s in sande if s.startswith("simulate")]) == rounds * (1 + extra)
    for stage in stages:
        record = json.loads((run / stage / "stage.json").read_text())
        kind = record["stage"]
        if not KINDS[kind].trains:
            continue
        t = record["config"]["training"]
        assert (t["zero"], t["dtype"], t["gradient_checkpointing"]) == \
            (shipped.training.zero, shipped.training.dtype, shipped.training.gradient_checkpointing), stage
        ds = record["deepspeed"]
        assert ds["world_size"] == 2 and ds["zero_stage"] == 3
        assert ds["offload_optimizer"] == ("offload" in shipped.training.zero)
        if "offload" in shipped.training.zero and kind != "simulate":
            assert ds["optimizer"] == "DeepSpeedCPUAdam"
        # CPU: bf16 autocast instead of DeepSpeed's bf16 engine, where the CPU has bf16 (else fp32, said so)
        assert ds["autocast"] == ("bfloat16" if cpu_has_native_bf16() else None)
    assert sorted(s for s in stages if s.startswith("evaluate")) == EVALUATIONS[name]
    for stage in EVALUATIONS[name]:
        report = json.loads((run / stage / "report.json").read_text())
        assert report["backend"] == "vllm" and report["dtype"] == "bfloat16" and report["num_prompts"] == 4
    parrot = json.loads((run / "evaluate_sande" / "report.json").read_text())["parrot"]
    assert parrot["k"] == shipped.removal.parrot_tokens
