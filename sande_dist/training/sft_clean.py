"""The clean-SFT control (`sft_clean`): eliminate's rows, learning rate and steps, with no parrot.

Every removal figure needs it: how much of a backdoor plain fine-tuning on the same
clean rows removes by itself. It trains what SANDE's eliminate stages train, with
the parrot slot left empty: the same rows (``training.eliminate.num_rows``, clean
targets, ``removal.clean_mix``), the same learning rate and schedule settings, and as
many steps as all of SANDE's rounds together (``removal.rounds`` times one eliminate
stage's epochs or ``max_steps``), in one stage. ``training.sft_clean`` overrides any
of these. Every weight trains; the model is exported like OSFT's.

Registered in ``sande_dist/registry.py``: this file and that entry are all a removal
method needs; the pipeline runs it on the backdoored model and evaluates it as
``evaluate_sft_clean``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from sande_dist.config import Config, TrainingConfig
from sande_dist.data.formats import Sample
from sande_dist.data.stages import eliminate_samples


def samples(cfg: Config, run_dir: Optional[Path] = None) -> list[Sample]:
    """Eliminate's rows, each without its parrot: the user message as it is, the clean response."""
    return [s.clean() for s in eliminate_samples(cfg, run_dir)]


def training(cfg: Config) -> TrainingConfig:
    """Eliminate's settings over all rounds, then ``training.sft_clean``'s own overrides."""
    tcfg = cfg.training.for_stage("eliminate")
    # With rounds: auto the pipeline runs this after SANDE and passes the rounds that ran.
    rounds = cfg.removal.rounds if cfg.removal.rounds != "auto" else cfg.removal.max_rounds
    scaled = {"epochs": tcfg.epochs * rounds}
    if tcfg.max_steps is not None:
        scaled["max_steps"] = tcfg.max_steps * rounds
    own = {k: v for k, v in cfg.training.sft_clean.model_dump().items() if v is not None}
    return tcfg.model_copy(update={**scaled, **own})
