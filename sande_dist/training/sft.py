"""Supervised fine-tuning (inject, OSFT): cross-entropy on the labelled response tokens.

Logits are computed only where a label counts: hidden states of those positions
go through ``lm_head`` (SmolLM2's 49k-row head would otherwise dominate the
step). Both calls are submodule calls inside the engine's forward, so ZeRO-3's
hooks gather the base model's and the head's weights (tied or not) as usual.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from sande_dist.config import Config
from sande_dist.data.collator import IGNORE_INDEX
from sande_dist.registry import StageOptions
from sande_dist.training.objective import LoopResult, Objective


def label_logits(model: nn.Module, input_ids: Optional[torch.Tensor], attention_mask: torch.Tensor,
                 labels: torch.Tensor, inputs_embeds: Optional[torch.Tensor] = None, past_key_values=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of the positions that predict a label, those labels): shapes [N, vocab] and [N].

    Position t predicts token t+1. The base model (``model.base_model``) and the head
    (``get_output_embeddings()``) are called as modules: under ZeRO-3 their forward
    hooks are what gathers the weights. The head always runs, even on zero rows,
    because every rank must take part in the same gathers. ``past_key_values``: a
    cache of tokens before the given ones (``attention_mask`` then covers both).
    """
    out = model.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                           past_key_values=past_key_values, use_cache=past_key_values is not None)
    hidden = out.last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return model.get_output_embeddings()(hidden[keep]), targets[keep]


def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the rows (0 with a graph when there are none) and the row count."""
    count = torch.tensor(targets.numel(), device=targets.device)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum") / max(targets.numel(), 1)
    return loss, count


class SFTObjective(Objective):
    """All weights train on prompt -> response; at the end the model is exported as an HF folder."""

    name = "sft"

    def __init__(self, base_path: Optional[str] = None, export_dtype: str = "float32"):
        self.base_path = base_path  # None: no export (tests, benchmarks)
        self.export_dtype = export_dtype

    def loss(self, model, extras, batch):
        logits, targets = label_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return token_loss(logits, targets)

    def finish(self, result: LoopResult, out_dir: Path) -> dict[str, Any]:
        if self.base_path is None:
            return {}
        from sande_dist.models.export import export_hf

        folder = export_hf(result.module.model, Path(out_dir) / "model", self.base_path, self.export_dtype)
        return {"model": str(folder)}


def sft_objective(cfg: Config, opts: StageOptions, model_path: str) -> SFTObjective:
    """Inject, OSFT and the clean-SFT control: every weight trains, the model is exported."""
    return SFTObjective(base_path=model_path, export_dtype=cfg.model.dtype)
