"""The training core on real ranks: ZeRO-0/2/3 agree, ZeRO-3 partitions, the export reproduces the engine.

One torchrun launch (tests/train_worker.py) does the training; these tests read its report.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_torchrun


@pytest.fixture(scope="module")
def report(tiny_model, tiny_untied_model, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("core")
    run_torchrun([str(REPO / "tests" / "train_worker.py"), "--model", str(tiny_model),
                  "--untied", str(tiny_untied_model), "--out", str(out)], timeout=900)
    return json.loads((out / "report.json").read_text()), out


def test_zero_stages_give_the_same_loss_curve(report):
    losses = report[0]["losses"]
    assert len(losses["zero0"]) == 10
    for zero in ("zero2", "zero3"):
        for a, b in zip(losses["zero0"], losses[zero]):
            assert abs(a - b) <= 1e-4 * abs(a), (zero, losses)
    assert losses["zero0"][-1] < losses["zero0"][0]  # it trains


def test_zero3_partitions_parameters_and_state(report):
    rep = report[0]
    for rank_shards in rep["shards"]:
        assert rank_shards, "no large parameters found"
        for name, frac in rank_shards.items():
            assert abs(frac - 0.5) < 0.01, (name, frac)
    z0, z3 = rep["bytes"]["zero0"], rep["bytes"]["zero3"]
    for r0, r3 in zip(z0, z3):
        # fp32 params + Adam moments: ZeRO-3 holds about half per rank (plus a fp32 master of its shard).
        assert r3["params"] <= 0.55 * r0["params"]
        assert r3["optimizer_states"] <= 0.55 * r0["optimizer_states"]
    print("per-rank state bytes:", {z: [m["total"] for m in rep["bytes"][z]] for z in rep["bytes"]})


def _hf_eval_loss(folder: Path, model_path: Path) -> float:
    from transformers import AutoModelForCausalLM

    import train_worker as w

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    samples, collator = w.data(str(model_path))
    total = count = 0.0
    with torch.no_grad():
        for batch in w.eval_batches(samples, collator, 0, 1):
            n = int((batch["labels"][:, 1:] != -100).sum())
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            total += out.loss.item() * n
            count += n
    return total / count


def test_export_reproduces_engine_loss_tied_and_untied(report, tiny_model, tiny_untied_model):
    from sande_dist.models.export import folder_keys

    rep, out = report
    tied, untied = out / "export_tied", out / "export_untied"
    assert folder_keys(tied) == folder_keys(tiny_model)
    assert "lm_head.weight" not in folder_keys(tied)
    assert "lm_head.weight" in folder_keys(untied) and folder_keys(untied) == folder_keys(tiny_untied_model)
    for folder in (tied, untied):
        assert (folder / "tokenizer.json").exists() and (folder / "generation_config.json").exists()
        assert not list(folder.parent.glob(f".{folder.name}.tmp"))
    assert abs(_hf_eval_loss(tied, tiny_model) - rep["eval_loss"]) <= 1e-5
    assert abs(_hf_eval_loss(untied, tiny_untied_model) - rep["eval_loss_untied"]) <= 1e-5


def test_deepspeed_ops_are_built_in_this_environment_not_the_shared_cache(tmp_path):
    """DeepSpeed's CPU Adam loads from this venv's own build folder (`make setup` prebuilds there); a
    shared ~/.cache/torch_extensions would be rebuilt by any other checkout's venv, under a lock a kill
    leaves behind. A TORCH_EXTENSIONS_DIR the user set is kept."""
    import os
    import subprocess
    import sys

    code = ("import os; from sande_dist.distributed.process_group import use_cpu_accelerator_if_no_cuda as u; u(); "
            "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder as B; B().load(verbose=False); "
            "print(os.environ['TORCH_EXTENSIONS_DIR'])")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1")  # the default cache would be under this HOME
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = Path(proc.stdout.split()[-1])
    assert folder == Path(sys.prefix) / "torch_extensions"
    assert list(folder.rglob("cpu_adam/*.so")), sorted(folder.rglob("*"))[:20]
    assert not (tmp_path / ".cache" / "torch_extensions").exists()
    mine = tmp_path / "mine"
    proc = subprocess.run([sys.executable, "-c", "import os; from sande_dist.distributed.process_group import "
                           "own_op_builds; print(own_op_builds())"], env={**env, "TORCH_EXTENSIONS_DIR": str(mine)},
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout.split()[-1] == str(mine), proc.stderr[-2000:]
