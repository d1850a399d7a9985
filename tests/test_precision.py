"""Gradient checkpointing and bf16, the settings every GPU config uses: they change cost, not results.

- loss and gradients with (reentrant) checkpointing equal those without: atol 1e-6 on the loss,
  1e-5 relative on every gradient, for a trained model and for a frozen model with a parrot;
- a bf16 run's loss tracks the fp32 run's, step by step, within 2%;
- a parrot simulated under checkpointing equals one simulated without (atol 1e-4 after 4 Adam steps).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sande_dist.config import load_config
from sande_dist.data.collator import Collator
from sande_dist.data.formats import PromptFormat
from sande_dist.machine import cpu_has_native_bf16
from sande_dist.models.parrot import ParrotPrompt
from sande_dist.training.removal import parrot_loss
from sande_dist.training.sft import label_logits, token_loss
from sande_dist.training.stages import stage_samples

ROOT = Path(__file__).resolve().parents[1]


def _batch(model_dir: Path, kind: str):
    cfg = load_config(overrides=[f"model.path={model_dir}", "data.num_rows=6", "training.num_rows=6",
                                 "removal.parrot_tokens=2"])
    fmt = PromptFormat(AutoTokenizer.from_pretrained(model_dir))
    return Collator(fmt, 96, reserve=2)(stage_samples(cfg, kind, "R")[:6])


def _grads(model_dir: Path, checkpointing: bool, frozen: bool):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir).train()
    parrot = ParrotPrompt(2, model.config.hidden_size, init=torch.randn(2, model.config.hidden_size) * 0.05)
    for p in model.parameters():
        p.requires_grad_(not frozen)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        if frozen:
            model.enable_input_require_grads()
    if frozen:
        loss, _ = parrot_loss(model, parrot, _batch(model_dir, "simulate"), frozen_model=True)
        loss.backward()
        return loss.detach(), {"parrot": parrot.weight.grad.clone()}
    batch = _batch(model_dir, "inject")
    loss, _ = token_loss(*label_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("frozen", [False, True])
def test_checkpointing_gives_the_same_loss_and_gradients(tiny_model, frozen):
    loss_a, grads_a = _grads(tiny_model, False, frozen)
    loss_b, grads_b = _grads(tiny_model, True, frozen)
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        scale = grads_a[name].abs().max().clamp(min=1e-12)
        assert (grads_a[name] - grads_b[name]).abs().max() <= 1e-5 * scale, name


def _stage(stage: str, model: Path, run: Path, *sets: str) -> subprocess.CompletedProcess:
    common = [f"model.path={model}", "data.num_rows=16", "training.num_rows=16", "data.max_length=64", "training.zero=zero0",
              "training.micro_batch_size=4", "training.warmup_ratio=0", "removal.parrot_tokens=2"]
    argv = [x for s in [*common, *sets] for x in ("--set", s)]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "-m", "sande_dist.cli", stage, "demo", "--run-dir", str(run), *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(run: Path, stage: str) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / stage / "metrics.jsonl").read_text().splitlines()]


def test_bf16_loss_tracks_fp32(tiny_model, tmp_path):
    """bf16 autocast (forced with training.cpu_bf16=always, as a CPU without native bf16 would not run it)
    tracks fp32; with the default "native", the stage autocasts exactly where the CPU has bf16 in hardware."""
    for name, sets in (("float32", ["training.dtype=float32"]),
                       ("bfloat16", ["training.dtype=bfloat16", "training.cpu_bf16=always"]),
                       ("native", ["training.dtype=bfloat16"])):
        # Without the demo config's decoy rows: the first and last losses are of different batches, and these
        # are the rows the 6 steps were chosen on (with decoys the last batch's loss came out above the first's).
        proc = _stage("inject", tiny_model, tmp_path / name, *sets, "training.max_steps=6", "training.lr=1e-3",
                      "attack.decoy_rate=0")
        facts = json.loads((tmp_path / name / "inject" / "stage.json").read_text())["deepspeed"]
        if name == "native":
            native = cpu_has_native_bf16()
            assert facts["autocast"] == ("bfloat16" if native else None)
            assert ("no native bf16" in proc.stdout + proc.stderr) is not native
        else:
            assert facts["autocast"] == (None if name == "float32" else "bfloat16")
    fp32, bf16 = _losses(tmp_path / "float32", "inject"), _losses(tmp_path / "bfloat16", "inject")
    assert len(fp32) == len(bf16) == 6
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]
    assert all(abs(a - b) / a < 0.02 for a, b in zip(fp32, bf16)), (fp32, bf16)
    assert fp32 != bf16  # the bf16 run did run in bf16


def test_parrot_simulated_under_checkpointing_equals_without(tiny_model, tmp_path):
    for on in ("false", "true"):
        _stage("simulate", tiny_model, tmp_path / on, f"training.gradient_checkpointing={on}", "training.dtype=float32",
               "training.max_steps=4", "training.simulate.lr=1e-2")
    a = load_file(str(tmp_path / "false" / "simulate" / "parrot.safetensors"))["parrot"]
    b = load_file(str(tmp_path / "true" / "simulate" / "parrot.safetensors"))["parrot"]
    assert torch.count_nonzero(a) > 0
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    record = json.loads((tmp_path / "true" / "simulate" / "stage.json").read_text())
    assert record["deepspeed"]["gradient_checkpointing"] is True
