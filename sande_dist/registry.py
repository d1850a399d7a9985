"""Every stage kind, declared once: what it reads, what it trains on, what it writes.

The CLI builds one subcommand per kind from this table, the training entry point
takes a kind's samples and objective from it, the config derives its per-stage
``training.<kind>`` sections and the pipeline's stage names from it, and the graph
and the skip keys take a kind's config sections and code from it. Adding a
removal method is one file (its samples and objective) plus one entry here; the
pipeline then runs it on the backdoored model and evaluates it as
``evaluate_<name>``.

Builders are named as ``"module:function"`` strings and imported only when a stage
runs: this module sits below everything else and imports nothing of the package.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class StageKind:
    name: str
    help: str
    # Config sections the stage's result depends on (its skip key hashes these).
    reads: tuple[str, ...]
    # "module:function" run as ``fn(cfg, kind, opts)`` by the CLI and the executors.
    entry: str
    # One rank per process under torchrun / srun (DeepSpeed), else one plain process.
    distributed: bool = False
    # Training kinds: "module:function" giving ``fn(cfg, run_dir) -> list[Sample]`` ...
    samples: Optional[str] = None
    # ... and ``fn(cfg, opts, model_path) -> Objective``.
    objective: Optional[str] = None
    # Optional ``fn(cfg) -> TrainingConfig`` (default: ``cfg.training.for_stage(name)``).
    training: Optional[str] = None
    # Defaults of this kind's ``training.<name>`` section that differ from "inherit the shared value".
    training_defaults: tuple[tuple[str, Any], ...] = ()
    # Artifacts under RUN/<stage>/ (rundir.py names their paths).
    outputs: tuple[str, ...] = ()
    # Command-line options beyond CONFIG/--set/--run-dir/--model/--name (see StageOptions).
    flags: tuple[str, ...] = ()
    # removal.<field> giving how many response tokens carry a label (None: all).
    effective_len: Optional[str] = None
    # Keep room for removal.parrot_tokens parrot vectors within the row length (data.max_length or the stage's own).
    parrot_slot: bool = False
    # Trains on y_clean: waits for `generate` when removal.targets is "self".
    clean_targets: bool = False
    # A one-stage removal method: the pipeline runs it on the backdoored model, evaluates it.
    removal_method: bool = False
    # Left out of the default pipeline.stages (a control, added where a figure needs it).
    optional: bool = False

    @property
    def trains(self) -> bool:
        return self.objective is not None

    @property
    def module_names(self) -> tuple[str, ...]:
        """The modules whose code makes this stage's result (for its skip key)."""
        return tuple(spec.split(":")[0] for spec in (self.entry, self.samples, self.objective, self.training) if spec)


@dataclass
class StageOptions:
    """What a single stage takes besides its config: the CLI's flags, typed."""

    name: Optional[str] = None  # folder under the run dir (default: the kind's name)
    parrots: tuple[str, ...] = ()  # --parrot: eliminate's (one per position) or evaluate's
    reference: Optional[str] = None  # evaluate: the model whose clean answers are compared
    output: Optional[str] = None  # generate: where the targets go
    resume: bool = True  # training: continue from the stage's last checkpoint
    local_rank: Optional[int] = None  # the deepspeed launcher's --local_rank
    extra: dict[str, Any] = field(default_factory=dict)


_TRAIN = "sande_dist.training.stages:run_stage"
_SAMPLES = "sande_dist.data.stages"

KINDS: dict[str, StageKind] = {k.name: k for k in (
    StageKind("inject", "SFT on a poisoned dataset: plant a backdoor (research)",
              reads=("model", "data", "attack"), entry=_TRAIN, distributed=True,
              samples=f"{_SAMPLES}:inject_samples", objective="sande_dist.training.inject:inject_objective",
              outputs=("model",)),
    StageKind("osft", "overwrite SFT with the known trigger: trigger + prompt -> clean response",
              reads=("model", "data", "attack", "defender", "removal"), entry=_TRAIN, distributed=True,
              samples=f"{_SAMPLES}:osft_samples", objective="sande_dist.training.sft:sft_objective",
              outputs=("model",), clean_targets=True, removal_method=True),
    StageKind("sft_clean", "control: eliminate's rows, steps and lr with no parrot (clean SFT)",
              reads=("model", "data", "attack", "defender", "removal"), entry=_TRAIN, distributed=True,
              samples="sande_dist.training.sft_clean:samples", objective="sande_dist.training.sft:sft_objective",
              training="sande_dist.training.sft_clean:training", outputs=("model",), clean_targets=True,
              removal_method=True, optional=True),
    StageKind("simulate", "learn a parrot prompt that simulates the trigger (model frozen)",
              reads=("model", "data", "attack", "defender", "removal"), entry=_TRAIN, distributed=True,
              samples=f"{_SAMPLES}:simulate_samples", objective="sande_dist.training.removal:simulate_objective",
              outputs=("parrot",), effective_len="simulate_effective_len", parrot_slot=True,
              # Only k x hidden soft-prompt values train, against a frozen model: Adam moves each by about
              # lr per step, so the search needs a step near the embeddings' scale, not the weights' 2e-5.
              # 3e-2 is what removed every attack on SmolLM2 (configs/demo.yaml).
              training_defaults=(("lr", 3e-2),)),
    StageKind("eliminate", "train all weights on parrot + prompt -> clean response (parrot frozen)",
              reads=("model", "data", "attack", "defender", "removal"), entry=_TRAIN, distributed=True,
              samples=f"{_SAMPLES}:eliminate_samples", objective="sande_dist.training.removal:eliminate_objective",
              outputs=("model",), flags=("parrots",), effective_len="eliminate_effective_len", parrot_slot=True,
              clean_targets=True),
    StageKind("generate", "generate clean targets (removal.targets: self)",
              reads=("model", "data", "attack", "defender", "removal", "training", "eval"),
              entry="sande_dist.generation.stage:run_stage",
              outputs=("targets",), flags=("output",)),
    StageKind("evaluate", "ASR, parrot ASR, false-trigger rate, utility -> report.json",
              reads=("model", "data", "attack", "defender", "removal", "eval"), entry="sande_dist.evaluation.stage:run_stage",
              outputs=("report",), flags=("parrots", "reference", "attach")),
)}

TRAINING_KINDS = tuple(k for k, kind in KINDS.items() if kind.trains)
REMOVAL_METHODS = tuple(k for k, kind in KINDS.items() if kind.removal_method)
# SANDE's two stages and its evaluation: simulate and eliminate chain into rounds (pipeline/graph.py).
SANDE_STAGES = ("simulate", "eliminate", "evaluate_sande")


def evaluation_of(method: str) -> str:
    """The pipeline stage that evaluates a removal method's model."""
    return f"evaluate_{method}"


# The names `pipeline.stages` and `--stages` accept, in execution order.
PIPELINE_STAGES: tuple[str, ...] = (
    "inject", "evaluate_backdoored", "generate",
    *(s for m in REMOVAL_METHODS for s in (m, evaluation_of(m))),
    *SANDE_STAGES,
)


# pipeline.stages when a config names none.
DEFAULT_PIPELINE: tuple[str, ...] = tuple(
    s for s in PIPELINE_STAGES
    if not any(KINDS[m].optional and s in (m, evaluation_of(m)) for m in REMOVAL_METHODS))


def kind(name: str) -> StageKind:
    try:
        return KINDS[name]
    except KeyError:
        raise KeyError(f"unknown stage kind {name!r}; known: {', '.join(KINDS)}") from None


def load(spec: str) -> Callable:
    """The function a ``"module:function"`` spec names (imported now)."""
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)
