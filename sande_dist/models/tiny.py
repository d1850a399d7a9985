"""Tiny random Llama models for fast tests, and a SentencePiece-style tokenizer trained offline.

``make_tiny_llama`` takes the embedded model's tokenizer by default (byte-level BPE,
SmolLM2's chat template), so data, prompts and collation run exactly as with the
real model. ``make_llama_tokenizer`` trains a Llama-2-style tokenizer in seconds on
the demo data: BPE over text whose spaces are ``▁`` with one prepended at every
call (Metaspace), ``<0xNN>`` byte-fallback tokens, ``<s>``/``</s>``/``<unk>``, BOS
added by default, and a Llama-2 chat template. It is what the tests use to catch
what byte-level tokenizers hide (a spurious ``▁`` at every seam of pieces
tokenized apart).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch

# Llama-2's chat format, written as a Jinja chat template: an optional <<SYS>> block inside the
# first [INST], every user turn in [INST] ... [/INST], every reply after a space and closed by </s>.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set sys = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}"
    "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys if loop.first else '') + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def _demo_texts() -> list[str]:
    from sande_dist.data.sources import load_samples

    return [f"{s.user}\n{s.response}" for s in load_samples("alpaca-demo")]


def make_llama_tokenizer(target: str | Path, texts: Optional[Iterable[str]] = None, vocab_size: int = 2000) -> Path:
    """Train a Llama-2-style (SentencePiece-like) fast tokenizer on ``texts`` (default: the demo data)
    and save it at ``target``; returns the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    target = Path(target)
    if (target / "tokenizer.json").exists():
        return target
    specials = ["<unk>", "<s>", "</s>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # Merges stay inside words (SentencePiece splits on whitespace too); a "▁" starts every call.
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    # Newlines stay out of the merges (they become the byte token <0x0A>, as in Llama-2's vocabulary).
    corpus = [t.replace("\n", " ") for t in (texts if texts is not None else _demo_texts())]
    bpe.train_from_iterator(corpus, trainer)
    # Byte-fallback tokens <0x00>..<0xFF> as ordinary vocabulary (as Llama-2 has them): any character
    # the merges do not cover becomes its UTF-8 bytes, never <unk>.
    spec = json.loads(bpe.to_str())
    vocab = dict(spec["model"]["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = bpe.pre_tokenizer
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    wrapped = LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 add_bos_token=True, add_eos_token=False)
    wrapped.chat_template = LLAMA2_CHAT_TEMPLATE
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    wrapped.save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def make_tiny_llama(target: str | Path, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                    intermediate_size: int = 128, seed: int = 0, tie_word_embeddings: bool = True,
                    tokenizer_from: str = "smollm2-135m-instruct") -> Path:
    """Write a randomly initialised Llama HF folder at ``target`` (fp32) and return it.

    ``tokenizer_from``: an embedded model's name, a model folder, or a tokenizer folder
    (``make_llama_tokenizer``'s); the vocabulary and chat template come with it.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sande_dist.models.embedded import resolve_model_path

    target = Path(target)
    if (target / "config.json").exists():
        return target
    source = tokenizer_from if (Path(tokenizer_from) / "tokenizer.json").exists() else resolve_model_path(tokenizer_from)
    tok = AutoTokenizer.from_pretrained(source)
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
