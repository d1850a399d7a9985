"""The stage graph of DESIGN §2, built from a config: which stages run, in what order, on what.

Every executor (local subprocesses, Slurm jobs) runs the same list of StagePlans;
a plan is the `sande` command line of one stage plus what it depends on.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import sande_dist
from sande_dist.config import PIPELINE_STAGES, Config
from sande_dist.errors import InputError

TRAIN_KINDS = {"inject", "osft", "simulate", "eliminate"}


@dataclass
class StagePlan:
    name: str  # folder under the run dir
    command: str  # sande subcommand
    args: list[str]  # after the config path
    deps: list[str] = field(default_factory=list)
    key: str = ""  # hash of the config, the stage's place in the graph and its deps' keys

    @property
    def distributed(self) -> bool:
        return self.command in TRAIN_KINDS

    def argv(self, config_path: str, run_dir: str) -> list[str]:
        return [self.command, config_path, "--run-dir", run_dir, *self.args]


# The config sections each command reads: a change elsewhere does not rerun it.
_READS = {"inject": ("model", "data", "attack"), "generate": ("model", "data", "eval"),
          "osft": ("model", "data", "attack", "removal"), "simulate": ("model", "data", "attack", "removal"),
          "eliminate": ("model", "data", "attack", "removal"),
          "evaluate": ("model", "data", "attack", "removal", "eval")}


def _key(cfg: Config, plan: StagePlan, deps: dict[str, StagePlan]) -> str:
    conf = cfg.model_dump(mode="json", include=set(_READS[plan.command]))
    if plan.distributed:
        conf["training"] = cfg.training.for_stage(plan.command).model_dump(mode="json")
    payload = {"config": conf, "command": plan.command, "args": plan.args,
               "deps": {d: deps[d].key for d in plan.deps}, "code": sande_dist.__version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def round_position(cfg: Config, r: int) -> str:
    """Where round ``r`` (from 1) splices its parrot: ``removal.resimulate_positions`` from round 2."""
    later = cfg.removal.resimulate_positions
    if r == 1 or not later:
        return cfg.removal.insert_position
    return later[min(r - 2, len(later) - 1)]


def build_plan(cfg: Config, run_dir: str, only: Optional[list[str]] = None) -> list[StagePlan]:
    """Stages in execution order. ``only`` (from --stages) must be a subset of pipeline.stages' names."""
    wanted = list(cfg.pipeline.stages)
    if only:
        unknown = [s for s in only if s not in PIPELINE_STAGES]
        if unknown:
            raise InputError(f"--stages: unknown stage(s) {unknown}; choose from {list(PIPELINE_STAGES)}")
        wanted = [s for s in PIPELINE_STAGES if s in only]
    run = Path(run_dir)
    has = set(wanted)
    backdoored = str(run / "inject" / "model") if "inject" in has else cfg.model.path
    plans: dict[str, StagePlan] = {}

    def add(name, command, args, deps):
        plan = StagePlan(name, command, args, [d for d in deps if d in plans])
        plan.key = _key(cfg, plan, plans)
        plans[name] = plan

    if "inject" in has:
        add("inject", "inject", [], [])
    if "generate" in has and cfg.removal.targets == "self":
        add("generate", "generate", ["--model", backdoored], ["inject"])
    clean_deps = ["inject", "generate"]
    parrot = str(run / "simulate" / "parrot.safetensors")
    if "osft" in has:
        add("osft", "osft", ["--model", backdoored], clean_deps)
    if "simulate" in has:
        add("simulate", "simulate", ["--model", backdoored], ["inject"])
    parrot_args = ["--parrot", parrot] if "simulate" in plans else []
    if "evaluate_backdoored" in has:
        add("evaluate_backdoored", "evaluate",
            ["--model", backdoored, "--name", "evaluate_backdoored", *parrot_args], ["inject", "simulate"])
    if "osft" in plans and "evaluate_osft" in has:
        add("evaluate_osft", "evaluate", ["--model", str(run / "osft" / "model"), "--name", "evaluate_osft",
                                          "--reference", backdoored, *parrot_args], ["osft", "simulate"])
    if "eliminate" in has:
        if "simulate" not in plans and not (run / "simulate" / "parrot.safetensors").exists():
            raise InputError("stage eliminate needs a parrot: add simulate to the stages "
                             "(or run it first so RUN/simulate/parrot.safetensors exists)")
        model = backdoored
        for r in range(1, cfg.removal.rounds + 1):
            sim, eli = ("simulate", "eliminate") if r == 1 else (f"simulate_r{r}", f"eliminate_r{r}")
            where = round_position(cfg, r)
            at = [] if where == cfg.removal.insert_position else ["--set", f"removal.insert_position={where}"]
            if r > 1:
                # Re-simulate against the updated model: a parrot that still finds a backdoor there.
                add(sim, "simulate", ["--model", model, "--name", sim, *at], [prev])
            # Extra parrots (removal.extra_parrots): searched beside the first on the same model,
            # eliminated together with it.
            extras = []
            for j, pos in enumerate(cfg.removal.extra_parrots, 1):
                name = f"{sim}_p{j}"
                if r > 1 or "simulate" in has:
                    add(name, "simulate", ["--model", model, "--name", name, "--set", f"removal.insert_position={pos}"],
                        [prev] if r > 1 else ["inject"])
                extras.append(name)
            given = [a for x in [sim, *extras] for a in ("--parrot", str(run / x / "parrot.safetensors"))]
            add(eli, "eliminate", ["--model", model, *given, "--name", eli, *at],
                clean_deps + [sim, *extras] + ([prev] if r > 1 else []))
            model, prev = str(run / eli / "model"), eli
        if "evaluate_sande" in has:
            add("evaluate_sande", "evaluate", ["--model", model, "--name", "evaluate_sande",
                                               "--reference", backdoored, "--parrot", parrot], [prev, "simulate"])
    return list(plans.values())
