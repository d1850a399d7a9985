"""Load a causal LM for training: partitioned at load time under ZeRO-3, right attention kernel, dtype.

Under ZeRO-3, ``HfDeepSpeedConfig`` must exist before ``from_pretrained`` (and stay
alive: transformers holds only a weak reference), so each rank materialises only
its shard; a 70B model is never whole on one rank.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Optional

import torch

from sande_dist.distributed.ds_config import zero_stage
from sande_dist.errors import InputError, read_json
from sande_dist.models.embedded import resolve_model_path
from sande_dist.rundir import weight_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Keeps the HfDeepSpeedConfig object alive for as long as the process trains.
_HF_DS_CONFIG: list[Any] = []


def safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size.

    A truncated, empty or non-safetensors file is an InputError naming it: the header
    is 8 bytes of length, then that much JSON, and every tensor's byte range must lie
    inside the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise InputError(f"{path} is not a complete safetensors file ({size} bytes; header length "
                             f"{n if n >= 0 else 'unreadable'}); re-export or re-copy it")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: its safetensors header is not valid JSON; the file is damaged") from None
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise InputError(f"{path}: its safetensors header does not describe tensors; the file is damaged") from None
    if 8 + n + end > size:
        raise InputError(f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}; "
                         "re-export or re-copy it")
    return header


ADAPTER_RECORD = "sande_adapter.json"


def merged_adapter(folder: Path, base: Optional[str] = None) -> Path:
    """A PEFT (LoRA) adapter folder merged into its base model, once: the merged HF folder in the cache.

    The base is ``base`` (``model.base``) or the adapter's own ``base_model_name_or_path``. The merged
    folder is keyed by both identities and carries ``sande_adapter.json`` (what it was made from), which
    stages copy into their records; every stage then trains or evaluates a plain full model.
    """
    import hashlib

    from sande_dist.assets import cache_dir
    from sande_dist.rundir import atomic_write_json, file_identity, model_identity

    adapter = read_json(folder / "adapter_config.json", "a PEFT adapter config")
    base = base or adapter.get("base_model_name_or_path")
    if not base:
        raise InputError(f"adapter {folder}: its adapter_config.json names no base model; set model.base")
    base_path = check_model(base)
    record = {"adapter": str(folder.resolve()), "adapter_identity": file_identity(folder), "base": base_path,
              "base_identity": model_identity(base_path), "peft_type": adapter.get("peft_type")}
    key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
    target = cache_dir() / "merged" / key
    if (target / ADAPTER_RECORD).exists():
        return target
    try:
        from peft import PeftModel
    except ImportError:
        raise InputError(f"model.path {folder} is a PEFT adapter: pip install 'sande-dist[peft]' to merge it") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    tmp = target.with_name(target.name + ".tmp")
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer_from = folder if (folder / "tokenizer_config.json").exists() else base_path
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(tmp)
    atomic_write_json(tmp / ADAPTER_RECORD, record)
    import os
    import shutil

    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def adapter_record(model_path: str) -> Optional[dict]:
    """What a merged adapter folder was made from (None for any other model)."""
    path = Path(model_path) / ADAPTER_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def check_model(path: str, base: Optional[str] = None) -> str:
    """``model.path`` resolved (embedded name, folder, hub id, or a PEFT adapter folder merged into its
    base, ``model.base``) and, when local, checked to load: config.json parses and every weight file is
    complete. Bad input is an InputError naming the file."""
    folder = Path(path).expanduser()
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        return str(merged_adapter(folder, base))
    try:
        resolved = resolve_model_path(path)
    except FileNotFoundError as exc:
        raise InputError(str(exc)) from None
    folder = Path(resolved)
    if not folder.exists():
        return resolved  # a hub id
    config = read_json(folder / "config.json", "a model config")
    if not isinstance(config, dict) or "model_type" not in config:
        raise InputError(f"{folder / 'config.json'}: no 'model_type'; not a Hugging Face model config")
    for f in weight_files(folder):
        if f.suffix == ".safetensors":
            safetensors_header(f)
    return resolved


def pick_attn_implementation(requested: Optional[str] = None) -> str:
    if requested:
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, dtype: str = "float32", ds_config: Optional[dict] = None,
               attn_implementation: Optional[str] = None, trust_remote_code: bool = False):
    """``from_pretrained`` with ZeRO-3 partitioning on load when ``ds_config`` says stage 3."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    _HF_DS_CONFIG.clear()
    if ds_config is not None and zero_stage(ds_config) == 3:
        _HF_DS_CONFIG.append(HfDeepSpeedConfig(ds_config))
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(path), dtype=DTYPES[dtype],
        attn_implementation=pick_attn_implementation(attn_implementation),
        trust_remote_code=trust_remote_code)
    model.config.use_cache = False
    return model
