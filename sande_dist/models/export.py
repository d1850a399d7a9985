"""Export a trained (possibly ZeRO-3-partitioned) model as a plain Hugging Face folder, shard by shard.

Outside a forward pass a ZeRO-3 parameter is an empty shard, and ``save_pretrained``
would write empty tensors; a 70B state dict does not fit one host's RAM either. So
the parameters are gathered one layer at a time (``GatheredParameters`` on that
layer's parameters, every rank taking part), rank 0 copies them to CPU in the
export dtype into a shard buffer, and a full buffer (``max_shard_bytes``) is
written as one safetensors file and dropped. Rank 0 holds at most one shard plus
one layer, whatever the model's size. Parameters come from ``named_parameters()``,
which lists a tied head once, under the embedding's name, as the base folder has
it. The folder is written under a temporary name, its key set checked against the
base model's, and only then renamed into place.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from sande_dist.distributed.process_group import barrier, rank
from sande_dist.errors import StageError
from sande_dist.models.embedded import resolve_model_path
from sande_dist.models.loading import DTYPES

DEFAULT_SHARD_BYTES = 5 * 2**30
_LAYER = re.compile(r"^(.*?\.\d+)\.")  # "model.layers.3.mlp.up_proj.weight" -> "model.layers.3"


def layer_groups(model: nn.Module) -> Iterator[list[tuple[str, nn.Parameter]]]:
    """Parameters in order, grouped by layer (consecutive names under the same numbered module)."""
    group: list[tuple[str, nn.Parameter]] = []
    key = None
    for name, param in model.named_parameters():
        m = _LAYER.match(name)
        this = m.group(1) if m else name
        if group and this != key:
            yield group
            group = []
        group.append((name, param))
        key = this
    if group:
        yield group


def _gathered_copies(group: list[tuple[str, nn.Parameter]], dtype: torch.dtype, keep: bool) -> dict[str, torch.Tensor]:
    """CPU copies of a group's full parameters (rank 0 keeps them; under ZeRO-3 every rank must call)."""
    if any(hasattr(p, "ds_id") for _, p in group):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
            return {n: p.data.detach().to("cpu", dtype).clone() for n, p in group} if keep else {}
    return {n: p.detach().to("cpu", dtype).contiguous() for n, p in group} if keep else {}


def write_shards(model: nn.Module, folder: Path, dtype: torch.dtype, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Write the model's weights as safetensors shards into ``folder`` (rank 0), one layer gathered at a
    time; every rank must call it. Returns the shard file names (rank 0; [] elsewhere)."""
    from safetensors.torch import save_file

    main = rank() == 0
    files: list[str] = []
    weight_map: dict[str, str] = {}
    buffer: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal buffer, size
        name = f"part-{len(files):05d}.safetensors"
        save_file(buffer, str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in buffer})
        buffer, size = {}, 0

    persistent = set(model.state_dict().keys())
    buffers = [[(n, b)] for n, b in model.named_buffers() if n in persistent]
    for group in [*layer_groups(model), *buffers]:
        copies = _gathered_copies(group, dtype if isinstance(group[0][1], nn.Parameter) else group[0][1].dtype, main)
        if not main:
            continue
        group_bytes = sum(t.numel() * t.element_size() for t in copies.values())
        if buffer and size + group_bytes > max_shard_bytes:
            flush()
        buffer.update(copies)
        size += group_bytes
    if not main:
        return []
    if buffer or not files:
        flush()
    return _name_shards(folder, files, weight_map)


def _name_shards(folder: Path, files: list[str], weight_map: dict[str, str]) -> list[str]:
    """HF's names: model.safetensors alone, or model-0000i-of-0000n.safetensors with an index."""
    if len(files) == 1:
        os.replace(folder / files[0], folder / "model.safetensors")
        return ["model.safetensors"]
    names = {old: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, old in enumerate(files)}
    for old, new in names.items():
        os.replace(folder / old, folder / new)
    total = sum((folder / n).stat().st_size for n in names.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: names[v] for k, v in sorted(weight_map.items())}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return list(names.values())


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


def export_hf(model: nn.Module, out: Path, base_path: str, dtype: str = "float32",
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``model`` to the HF folder ``out`` (every rank calls; rank 0 writes)."""
    from transformers import AutoTokenizer, GenerationConfig

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    write_shards(model, tmp, DTYPES[dtype], max_shard_bytes)
    if rank() == 0:
        base = Path(resolve_model_path(base_path))
        model.config.use_cache = True
        model.config.dtype = DTYPES[dtype]
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        model.config.use_cache = False
        AutoTokenizer.from_pretrained(base).save_pretrained(tmp)
        if (base / "generation_config.json").exists():
            shutil.copy2(base / "generation_config.json", tmp / "generation_config.json")
        elif model.generation_config is not None:
            GenerationConfig.from_model_config(model.config).save_pretrained(tmp)
        got, want = folder_keys(tmp), folder_keys(base)
        if got != want:
            raise StageError(f"exported model at {tmp} does not match the base model's tensors: "
                             f"missing {sorted(want - got)[:5]}, unexpected {sorted(got - want)[:5]}")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    barrier()
    return out
