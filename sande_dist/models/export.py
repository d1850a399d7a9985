"""Export a trained (possibly ZeRO-3-partitioned) model as a plain Hugging Face folder.

Outside a forward pass a ZeRO-3 parameter is an empty shard, and ``save_pretrained``
would write empty tensors; so each parameter is gathered in turn
(``GatheredParameters``) and rank 0 keeps a CPU copy. Parameters are taken from
``named_parameters()``, which lists a tied head once, under the embedding's name;
``save_pretrained`` then writes it the way the base model's folder has it. The
folder is written under a temporary name, its key set checked against the base
model's, and only then renamed into place.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from sande_dist.distributed.process_group import barrier, rank
from sande_dist.errors import StageError
from sande_dist.models.embedded import resolve_model_path
from sande_dist.models.loading import DTYPES


def gather_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The full state dict on rank 0 (other ranks get {}); every rank must call it."""
    is_main = rank() == 0
    out: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if is_main:
                    out[name] = param.data.detach().to("cpu", dtype).clone()
        elif is_main:
            out[name] = param.detach().to("cpu", dtype).clone()
    persistent = set(model.state_dict().keys())
    for name, buf in model.named_buffers():
        if is_main and name in persistent:
            out[name] = buf.detach().cpu().clone()
    return out


def folder_keys(folder: Path) -> set[str]:
    """Tensor names stored in an HF folder's safetensors files."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    keys: set[str] = set()
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            keys.update(fh.keys())
    if not keys:
        raise StageError(f"{folder} has no safetensors weights")
    return keys


def export_hf(model: nn.Module, out: Path, base_path: str, dtype: str = "float32") -> Path:
    """Write ``model`` to the HF folder ``out`` (every rank calls; rank 0 writes)."""
    from transformers import AutoTokenizer, GenerationConfig

    out = Path(out)
    state = gather_state_dict(model, DTYPES[dtype])
    if rank() == 0:
        base = Path(resolve_model_path(base_path))
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.config.use_cache = True
        model.config.dtype = DTYPES[dtype]
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True, max_shard_size="5GB")
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        if (base / "generation_config.json").exists():
            shutil.copy2(base / "generation_config.json", tmp / "generation_config.json")
        elif model.generation_config is not None:
            GenerationConfig.from_model_config(model.config).save_pretrained(tmp)
        model.config.use_cache = False
        got, want = folder_keys(tmp), folder_keys(base)
        if got != want:
            raise StageError(f"exported model at {tmp} does not match the base model's tensors: "
                             f"missing {sorted(want - got)[:5]}, unexpected {sorted(got - want)[:5]}")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    barrier()
    return out
