"""Load a causal LM for training: partitioned at load time under ZeRO-3, right attention kernel, dtype.

Under ZeRO-3, ``HfDeepSpeedConfig`` must exist before ``from_pretrained`` (and stay
alive: transformers holds only a weak reference), so each rank materialises only
its shard; a 70B model is never whole on one rank.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Optional

import torch

from sande_dist.distributed.ds_config import zero_stage
from sande_dist.models.embedded import resolve_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Keeps the HfDeepSpeedConfig object alive for as long as the process trains.
_HF_DS_CONFIG: list[Any] = []


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
