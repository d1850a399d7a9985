"""The Objective interface: what a stage trains and how a batch becomes a loss.

The loop (``training/loop.py``) knows nothing of backdoors. An objective says:
- ``extra_modules``: modules trained or used beside the model (a parrot prompt);
  they become submodules of the engine's module, so ZeRO-3 partitions them too
  (read or write them inside ``deepspeed.zero.GatheredParameters``);
- ``select_trainable``: which parameters train (sets ``requires_grad``); only
  those reach the optimizer, so a frozen model has no optimizer state;
- ``loss``: runs *inside* the engine's forward. Under ZeRO-3 a parameter is
  gathered only by its module's forward hooks, so reach weights by calling
  submodules (``model.model(...)``, ``model.lm_head(...)``), never ``.weight``;
- ``finish``: after the last step, on every rank (collectives allowed): write
  the stage's artifacts; returns what ``stage.json`` records about them;
- ``inputs``: identities of files it reads besides the model and data (eliminate's
  parrots), for the stage's skip key.

The registry (``sande_dist/registry.py``) names each kind's builder,
``fn(cfg, opts, model_path) -> Objective``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn


class Objective:
    name: str = "objective"

    def extra_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules beside the model (built after it is loaded, under the training seed)."""
        return {}

    def select_trainable(self, model: nn.Module, extras: nn.ModuleDict) -> None:
        """Default: every model weight and every extra module trains."""
        for p in model.parameters():
            p.requires_grad_(True)
        for p in extras.parameters():
            p.requires_grad_(True)

    def loss(self, model: nn.Module, extras: nn.ModuleDict,
             batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scalar loss to back-propagate, number of tokens it averages over) for one micro-batch."""
        raise NotImplementedError

    def finish(self, result: "LoopResult", out_dir: Path) -> dict[str, Any]:
        """Write the stage's artifacts into ``out_dir``; every rank calls it."""
        return {}

    def inputs(self) -> dict[str, str]:
        """Identities of the files this objective reads besides the model and the data."""
        return {}

    def check_every(self, steps: int) -> Optional[int]:
        """Steps between the objective's own checks of the model (None: none)."""
        return None

    def check(self, module: "TrainModule", step: int) -> dict:
        """Measure the model being trained (every rank calls; collectives allowed); the record is kept."""
        return {}

    def done(self, step: int, losses: list[float]) -> bool:
        """Stop before the step budget? ``losses``: this run's steps' losses (the same on every rank)."""
        return False

    def state(self) -> dict[str, Any]:
        """What the objective has learnt while training (JSON), saved with each checkpoint."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Take back ``state()`` from the checkpoint a killed run resumes from."""


class TrainModule(nn.Module):
    """What the DeepSpeed engine wraps: the model, the objective's extras, the objective's loss.

    ``autocast`` runs the forward in bf16 autocast with fp32 weights (CPU mixed
    precision; on CUDA DeepSpeed's own bf16 mode is used instead).
    """

    def __init__(self, model: nn.Module, objective: Objective, extras: Optional[dict[str, nn.Module]] = None,
                 autocast: Optional[torch.dtype] = None):
        super().__init__()
        self.model = model
        self.extras = nn.ModuleDict(extras or {})
        self.objective = objective  # a plain object, not a submodule
        self.autocast = autocast

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.autocast is None:
            return self.objective.loss(self.model, self.extras, batch)
        device = "cuda" if next(iter(batch.values())).is_cuda else "cpu"
        with torch.autocast(device, dtype=self.autocast):
            loss, tokens = self.objective.loss(self.model, self.extras, batch)
        return loss.float(), tokens


@dataclass
class LoopResult:
    engine: Any  # deepspeed.DeepSpeedEngine wrapping a TrainModule
    module: TrainModule
    step: int  # optimizer steps done
    total_steps: int
    stopped_by_signal: bool  # True: a checkpoint was saved on SIGTERM/SIGUSR1; do not finish the stage
    resumed_from: Optional[int]
    # Seconds in engine set-up, resume, compute and checkpoint writing; bytes of checkpoints written.
    timings: dict = field(default_factory=dict)
    checkpoint_bytes: int = 0
    # The objective's ``done`` ended training here, before the budget (None: it ran the budget).
    stopped_early_at: Optional[int] = None
    losses: list = field(default_factory=list)  # every step's loss this run (after a resume: since it)
