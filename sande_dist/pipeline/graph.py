"""The stage graph of a config: which stages run, in what order, on which models and parrots.

Every executor (local subprocesses, Slurm jobs) runs the same list of StagePlans;
a plan is the `sande` command line of one stage plus what it depends on. The
registry says what each kind reads; a removal method of one stage (OSFT, the
clean-SFT control) is wired generically: it trains on the backdoored model and
its model is evaluated as ``evaluate_<method>``. SANDE chains simulate and
eliminate into rounds.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sande_dist.config import Config
from sande_dist.errors import InputError
from sande_dist.registry import KINDS, PIPELINE_STAGES, REMOVAL_METHODS, evaluation_of
from sande_dist.rundir import model_dir, parrot_file, stage_code
from sande_dist.training.stages import stage_training


@dataclass
class StagePlan:
    name: str  # folder under the run dir
    kind: str  # the registry's stage kind (the `sande` subcommand)
    args: list[str]  # after the config path
    deps: list[str] = field(default_factory=list)
    key: str = ""  # hash of what the stage reads, its code, its place in the graph and its deps' keys

    @property
    def distributed(self) -> bool:
        return KINDS[self.kind].distributed

    def argv(self, config_path: str, run_dir: str) -> list[str]:
        return [self.kind, config_path, "--run-dir", run_dir, *self.args]


def _key(cfg: Config, plan: StagePlan, deps: dict[str, StagePlan], run_dir: str) -> str:
    """The stage's key: a change to anything it reads reruns it, a change elsewhere does not.

    Paths inside the run dir are hashed relative to it, so a moved run dir keeps its keys.
    """
    spec = KINDS[plan.kind]
    conf = cfg.model_dump(mode="json", include=set(spec.reads))
    if spec.trains:
        conf["training"] = stage_training(cfg, plan.kind).model_dump(mode="json")
    prefix = run_dir.rstrip("/") + "/"
    args = ["$RUN/" + a[len(prefix):] if a.startswith(prefix) else a for a in plan.args]
    payload = {"config": conf, "kind": plan.kind, "args": args, "code": stage_code(plan.kind),
               "deps": {d: deps[d].key for d in plan.deps}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def round_position(cfg: Config, r: int) -> str:
    """Where round ``r`` (from 1) splices its parrot: ``removal.resimulate_positions`` from round 2."""
    later = cfg.removal.resimulate_positions
    if r == 1 or not later:
        return cfg.removal.insert_position
    return later[min(r - 2, len(later) - 1)]


class _Graph:
    """Plans in insertion order; a dependency on a stage that is not planned is dropped."""

    def __init__(self, cfg: Config, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir
        self.plans: dict[str, StagePlan] = {}

    def add(self, name: str, kind: str, args: list[str], deps: list[str]) -> None:
        plan = StagePlan(name, kind, args, [d for d in deps if d in self.plans])
        plan.key = _key(self.cfg, plan, self.plans, self.run_dir)
        self.plans[name] = plan


def _sande_rounds(g: _Graph, backdoored: str, clean_deps: list[str], first_simulated: bool) -> str:
    """Simulate/eliminate rounds from ``backdoored``; returns the last eliminate's stage name."""
    cfg, run = g.cfg, g.run_dir
    model, prev = backdoored, ""
    for r in range(1, cfg.removal.rounds + 1):
        sim, eli = ("simulate", "eliminate") if r == 1 else (f"simulate_r{r}", f"eliminate_r{r}")
        where = round_position(cfg, r)
        at = [] if where == cfg.removal.insert_position else ["--set", f"removal.insert_position={where}"]
        if r > 1:
            # Re-simulate against the updated model: a parrot that still finds a backdoor there.
            g.add(sim, "simulate", ["--model", model, "--name", sim, *at], [prev])
        # Extra parrots (removal.extra_parrots): searched beside the first on the same model,
        # eliminated together with it.
        extras = []
        for j, pos in enumerate(cfg.removal.extra_parrots, 1):
            name = f"{sim}_p{j}"
            if r > 1 or first_simulated:
                g.add(name, "simulate", ["--model", model, "--name", name, "--set", f"removal.insert_position={pos}"],
                      [prev] if r > 1 else ["inject"])
            extras.append(name)
        given = [a for x in [sim, *extras] for a in ("--parrot", str(parrot_file(run, x)))]
        g.add(eli, "eliminate", ["--model", model, *given, "--name", eli, *at],
              clean_deps + [sim, *extras] + ([prev] if r > 1 else []))
        model, prev = str(model_dir(run, eli)), eli
    return prev


def build_plan(cfg: Config, run_dir: str, only: Optional[list[str]] = None) -> list[StagePlan]:
    """Stages in execution order. ``only`` (from --stages) must be a subset of the pipeline's names."""
    wanted = list(cfg.pipeline.stages)
    if only:
        unknown = [s for s in only if s not in PIPELINE_STAGES]
        if unknown:
            raise InputError(f"--stages: unknown stage(s) {unknown}; choose from {list(PIPELINE_STAGES)}")
        wanted = [s for s in PIPELINE_STAGES if s in only]
    has = set(wanted)
    g = _Graph(cfg, run_dir)
    backdoored = str(model_dir(run_dir, "inject")) if "inject" in has else cfg.model.path
    if "inject" in has:
        g.add("inject", "inject", [], [])
    if "generate" in has and cfg.removal.targets == "self":
        g.add("generate", "generate", ["--model", backdoored], ["inject"])
    clean_deps = ["inject", "generate"]
    methods = [m for m in REMOVAL_METHODS if m in has]
    for method in methods:
        g.add(method, method, ["--model", backdoored], clean_deps)
    if "simulate" in has:
        g.add("simulate", "simulate", ["--model", backdoored], ["inject"])
    parrot = str(parrot_file(run_dir))
    last = None
    if "eliminate" in has:
        if "simulate" not in g.plans and not Path(parrot).exists():
            raise InputError("stage eliminate needs a parrot: add simulate to the stages "
                             "(or run it first so RUN/simulate/parrot.safetensors exists)")
        last = _sande_rounds(g, backdoored, clean_deps, "simulate" in has)
    # Evaluations after every training stage: the local executor runs each run of consecutive
    # training stages in one launch, and the evaluations in one process after them.
    parrot_args = ["--parrot", parrot] if "simulate" in g.plans else []
    if "evaluate_backdoored" in has:
        g.add("evaluate_backdoored", "evaluate",
              ["--model", backdoored, "--name", "evaluate_backdoored", *parrot_args], ["inject", "simulate"])
    for method in methods:
        name = evaluation_of(method)
        if name in has:
            g.add(name, "evaluate", ["--model", str(model_dir(run_dir, method)), "--name", name,
                                     "--reference", backdoored, *parrot_args], [method, "simulate"])
    if last and "evaluate_sande" in has:
        g.add("evaluate_sande", "evaluate", ["--model", str(model_dir(run_dir, last)), "--name", "evaluate_sande",
                                             "--reference", backdoored, "--parrot", parrot], [last, "simulate"])
    return list(g.plans.values())
