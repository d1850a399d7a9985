"""`sande plan` against DeepSpeed's own model-state estimators and a real model's saved activations."""
from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sande_dist import cli
from sande_dist.pipeline import planner

# Published configs of the three sizes the issue names.
LLAMA2 = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               intermediate_size=11008, vocab_size=32000),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                intermediate_size=13824, vocab_size=32000),
    "70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                intermediate_size=28672, vocab_size=32000),
}


def _real_counts(size: str) -> tuple[int, int]:
    """Total and largest-module parameter counts of the real HF model, built on the meta device."""
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA2[size]))
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return total, largest


def _deepspeed_table(fn, **kwargs) -> dict[str, tuple[float, float]]:
    """DeepSpeed's *_all_cold estimators print a table: options -> (GiB per CPU, GiB per GPU)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(**kwargs)
    rows = {}
    for line in out.getvalue().splitlines():
        m = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)", line)
        if m:
            options = m.group(3).replace("OffloadDeviceEnum.cpu", "cpu").replace(" ", "")
            rows[options] = (float(m.group(1)), float(m.group(2)))
    return rows


def _close(ours_bytes: float, theirs_gib: float) -> bool:
    return abs(ours_bytes / planner.GIB - theirs_gib) <= 0.05 * theirs_gib + 0.005  # DeepSpeed prints 2 decimals


@pytest.mark.parametrize("size", ["7b", "13b", "70b"])
@pytest.mark.parametrize("nodes,gpus", [(1, 8), (4, 8)])
def test_model_states_match_deepspeed_estimators(size, nodes, gpus):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    total, largest = _real_counts(size)
    shape = planner.KNOWN_SHAPES[f"llama2-{size}"]
    assert shape.params == total and shape.largest_layer_params == largest

    z3 = _deepspeed_table(estimate_zero3_model_states_mem_needs_all_cold, total_params=total,
                          largest_layer_params=largest, num_gpus_per_node=gpus, num_nodes=nodes)
    z2 = _deepspeed_table(estimate_zero2_model_states_mem_needs_all_cold, total_params=total,
                          num_gpus_per_node=gpus, num_nodes=nodes)
    expected = {
        "zero2": z2["offload_optimizer=none"],
        "zero3": z3["offload_param=none,offload_optimizer=none,zero_init=1"],
        "zero3_offload": z3["offload_param=cpu,offload_optimizer=cpu,zero_init=1"],
    }
    for preset, (cpu_gib, gpu_gib) in expected.items():
        gpu, cpu = planner.model_state_bytes(preset, total, largest, nodes, gpus)
        assert _close(gpu, gpu_gib), (preset, gpu / planner.GIB, gpu_gib)
        assert _close(cpu, cpu_gib), (preset, cpu / planner.GIB, cpu_gib)


def test_plan_70b_cli_table_and_json(capsys):
    argv = ["plan", "--params", "70e9", "--nodes", "4", "--gpus-per-node", "8", "--gpu-mem-gib", "80"]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out
    assert "llama2-70b" in table and "recommended: zero3," in table and "per 1000 samples" in table

    assert cli.main(argv + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    rows = {r["preset"]: r for r in plan["presets"]}
    # ZeRO-2 keeps 140 GB of bf16 weights on every GPU: cannot fit; ZeRO-3 over 32 GPUs does.
    assert not rows["zero2"]["fits"] and rows["zero2"]["limit"] == "gpu memory"
    assert rows["zero3"]["fits"] and plan["recommended"]["preset"] == "zero3"
    assert plan["recommended"]["total_gpu_gib"] <= plan["usable_gpu_gib"]
    # The figures printed are DeepSpeed's, for the model's own largest layer (the 262M-row embedding).
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold

    ds = _deepspeed_table(estimate_zero3_model_states_mem_needs_all_cold, total_params=70_000_000_000,
                          largest_layer_params=plan["largest_layer_params"], num_gpus_per_node=8, num_nodes=4)
    assert _close(rows["zero3"]["model_states_gpu_gib"] * planner.GIB,
                  ds["offload_param=none,offload_optimizer=none,zero_init=1"][1])
    # 6 * N * tokens at 40% of 989 TFLOP/s on 32 GPUs.
    assert plan["seconds_per_1k_samples"] == pytest.approx(6 * 70e9 * 2048 * 1000 / (32 * 989e12 * 0.4), rel=1e-3)


def test_activation_estimate_matches_a_real_models_saved_tensors():
    """What autograd keeps for backward on a small real Llama (bf16, sdpa) vs the formula."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=344, vocab_size=512, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    shape = planner.ModelShape("tiny", 128, 4, 4, 2, 344, 512)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, 512, (2, 256))

    def saved_bytes() -> int:
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        return sum(n for ptr, n in seen.items() if ptr not in params)

    full = saved_bytes()
    assert planner.activation_bytes(shape, 2, 256, False) == pytest.approx(full, rel=0.1)
    model.gradient_checkpointing_enable()
    model.train()
    checkpointed = saved_bytes()
    # With checkpointing the estimate adds the one layer recomputed during backward.
    assert checkpointed <= planner.activation_bytes(shape, 2, 256, True) < full


def test_shape_from_params_and_bad_input(capsys):
    assert planner.shape_for_params(7e9).name == "llama2-7b"
    odd = planner.shape_for_params(30e9)
    assert abs(odd.params - 30e9) / 30e9 < 0.05 and odd.hidden == 8192
    assert cli.main(["plan", "--nodes", "2"]) == 2
    assert "--params" in capsys.readouterr().err
    assert cli.main(["plan", "--params", "7e9", "--mfu", "1.5"]) == 2
    # Host memory limits offload: the row says so.
    p = planner.plan(params=70e9, nodes=1, gpus_per_node=8, gpu_mem_gib=80, cpu_mem_gib=512,
                     preset="zero3_offload")
    assert p.recommended is None and p.presets[0].limit == "host memory"
