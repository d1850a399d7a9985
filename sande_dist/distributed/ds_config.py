"""DeepSpeed configs: a preset from ds_configs/ (or a user's JSON) with its "auto" values filled.

Users edit the JSON files; the code fills only what follows from the training
config (batch sizes, clipping, dtype, lr) and the model (bucket sizes). An
"auto" left anywhere else is an error that names the key.
"""
from __future__ import annotations

import copy
import json
from typing import Any, Optional

from sande_dist.config import TrainingConfig, ds_config_file
from sande_dist.errors import InputError


def load_preset(zero: str) -> tuple[dict, str]:
    """The raw JSON of ``training.zero`` (a preset name or a path) and where it came from."""
    try:
        path = ds_config_file(zero)
    except ValueError as exc:
        raise InputError(f"training.zero: {exc}") from None
    return json.loads(path.read_text()), str(path)


def _set_auto(node: dict, key: str, value: Any) -> None:
    if node.get(key) == "auto":
        node[key] = value


def _unfilled(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _unfilled(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def build_ds_config(tcfg: TrainingConfig, world_size: int, hidden_size: Optional[int] = None,
                    cuda: bool = False) -> dict:
    """The DeepSpeed config for one stage: the preset with every "auto" filled."""
    raw, source = load_preset(tcfg.zero)
    ds = copy.deepcopy(raw)
    _set_auto(ds, "train_micro_batch_size_per_gpu", tcfg.micro_batch_size)
    _set_auto(ds, "gradient_accumulation_steps", tcfg.grad_accum)
    _set_auto(ds, "train_batch_size", tcfg.micro_batch_size * tcfg.grad_accum * world_size)
    _set_auto(ds, "gradient_clipping", tcfg.max_grad_norm)
    for key, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        if isinstance(ds.get(key), dict):
            _set_auto(ds[key], "enabled", tcfg.dtype == dtype)
    opt = ds.get("optimizer", {}).get("params")
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if isinstance(opt, dict):
        _set_auto(opt, "lr", tcfg.lr)
        _set_auto(opt, "weight_decay", tcfg.weight_decay)
        offload = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
        # FusedAdam needs CUDA; torch's AdamW is what runs on the CPU accelerator.
        if not cuda and not offload:
            opt.setdefault("torch_adam", True)
    if hidden_size:
        # The sizes HF's Trainer integration derives from the hidden size.
        _set_auto(zero, "reduce_bucket_size", hidden_size * hidden_size)
        _set_auto(zero, "allgather_bucket_size", hidden_size * hidden_size)
        _set_auto(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size))
        _set_auto(zero, "stage3_param_persistence_threshold", 10 * hidden_size)
    else:
        for key, value in (("reduce_bucket_size", int(5e8)), ("allgather_bucket_size", int(5e8)),
                           ("stage3_prefetch_bucket_size", int(5e7)), ("stage3_param_persistence_threshold", int(1e5))):
            _set_auto(zero, key, value)
    left = _unfilled(ds)
    if left:
        raise InputError(f"{source}: cannot fill \"auto\" for {left}; give explicit values there")
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))
