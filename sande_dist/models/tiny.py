"""Tiny random Llama models for fast tests: same tokenizer as the embedded model, seconds to train."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def make_tiny_llama(target: str | Path, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                    intermediate_size: int = 128, seed: int = 0, tie_word_embeddings: bool = True,
                    tokenizer_from: str = "smollm2-135m-instruct") -> Path:
    """Write a randomly initialised Llama HF folder at ``target`` (fp32) and return it.

    The tokenizer (and so the vocabulary and chat template) is the embedded model's,
    so data, prompts and collation are exercised exactly as with the real model.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sande_dist.models.embedded import resolve_model_path

    target = Path(target)
    if (target / "config.json").exists():
        return target
    tok = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_from))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=intermediate_size, max_position_embeddings=1024,
                      tie_word_embeddings=tie_word_embeddings, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, target)
    return target
