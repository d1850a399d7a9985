"""The engine protocol: greedy generation and multiple-choice scoring, one interface, two backends.

The backends (``hf.py``, ``vllm_backend.py``) implement it; ``factory.py`` picks one.

Evaluation sends token ids (exactly what training saw), not text; a parrot
request is a 2-D tensor of prompt embeddings ``[T, hidden]``. Scoring follows
lm-eval's split: ``score_choices`` returns each continuation's summed
log-probability and its token count, so callers compute acc and acc_norm.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from sande_dist.errors import InputError
from sande_dist.machine import cpu_has_native_bf16

# A prompt as text, as token ids, or as embeddings [T, hidden] (parrot requests).
Request = Union[str, list[int], torch.Tensor]


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy, the only setting evaluation uses
    seed: int = 0


@dataclass(frozen=True)
class ChoiceScore:
    logprob: float  # sum over the continuation's tokens
    num_tokens: int


class Engine:
    """Base of both backends: ``generate`` and ``score_choices`` over token-id prompts."""

    backend = "base"
    tokenizer = None

    def generate(self, requests: Sequence[Request], params: GenerationParams) -> list[str]:
        raise NotImplementedError

    def score_choices(self, prompts: Sequence[Union[str, list[int]]],
                      choices: Sequence[Sequence[Union[str, list[int]]]]) -> list[list[ChoiceScore]]:
        """Log-probability of each choice as a continuation of its prompt (one list per prompt)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model (and any worker processes)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _prompt_ids(self, prompt: Union[str, list[int]]) -> list[int]:
        # Text prompts get the tokenizer's own special tokens (BOS where it adds one), as vLLM does.
        return list(prompt) if not isinstance(prompt, str) else self.tokenizer(prompt)["input_ids"]

    def _choice_ids(self, choice: Union[str, list[int]]) -> list[int]:
        ids = list(choice) if not isinstance(choice, str) else \
            self.tokenizer(choice, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"choice {choice!r} has no tokens")
        return ids


def pick_dtype(requested: Optional[str], model_dtype: str) -> str:
    """``eval.dtype`` when set; otherwise bf16 where the hardware runs it fast, else the model's dtype.

    Greedy evaluation of a bf16 model is the norm on GPUs; on CPUs with avx512_bf16
    it is 2-3x faster than fp32 (DESIGN §5). Tests that compare backends set fp32.
    """
    if requested:
        return requested
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else model_dtype


def vllm_available() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import vllm  # noqa: F401  (a CUDA-only torchvision, for one, breaks the import)
    except Exception:
        return False
    return True


def load_input_embeddings(model_dir: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The input embedding matrix [vocab, hidden], read from safetensors without building the model.

    Its parameter name comes from a meta-device instance of the architecture, so it
    works for any HF causal LM whose input embeddings are a plain table.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config)
    table = shell.get_input_embeddings().weight
    name = next(n for n, p in shell.named_parameters() if p is table)
    folder = Path(model_dir)
    index = folder / "model.safetensors.index.json"
    files = [folder / json.loads(index.read_text())["weight_map"][name]] if index.exists() \
        else sorted(folder.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            # Checkpoints sometimes drop the model's own prefix (e.g. "model.").
            for key in (name, name.split(".", 1)[-1]):
                if key in fh.keys():
                    return fh.get_tensor(key).to(dtype)
    raise InputError(f"{model_dir}: no input embedding tensor {name!r} in its safetensors files")
