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
from typing import Optional, Sequence

from sande_dist.config import Config
from sande_dist.errors import InputError
from sande_dist.registry import KINDS, PIPELINE_STAGES, REMOVAL_METHODS, evaluation_of
from sande_dist.rundir import model_dir, parrot_file, read_stage, rounds_file, stage_code, stage_dir
from sande_dist.training.search import control_band, pooled_emission, verdict
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

    Paths inside the run dir are hashed relative to it, so a moved run dir keeps its keys. A stage given
    ``--model`` loads that model, so model.path is not part of its key (a scan's reference searches are
    reused when another model is scanned in the same run dir).
    """
    spec = KINDS[plan.kind]
    conf = cfg.model_dump(mode="json", include=set(spec.reads))
    if "--model" in plan.args and "model" in conf:  # the stage loads the model its args name, not model.path
        conf["model"].pop("path", None)
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


class Graph:
    """Plans in insertion order; a dependency on a stage that is not planned is dropped."""

    def __init__(self, cfg: Config, run_dir: str):
        self.cfg, self.run_dir = cfg, run_dir
        self.plans: dict[str, StagePlan] = {}

    def add(self, name: str, kind: str, args: list[str], deps: list[str]) -> None:
        plan = StagePlan(name, kind, args, [d for d in deps if d in self.plans])
        plan.key = _key(self.cfg, plan, self.plans, self.run_dir)
        self.plans[name] = plan


def positions(cfg: Config) -> list[str]:
    """The parrot positions a search covers: removal.insert_position, then removal.extra_parrots."""
    return [cfg.removal.insert_position, *cfg.removal.extra_parrots]


def search_names(name: str, cfg: Config) -> list[str]:
    """One simulate stage per position: ``name``, ``name_p1``, ..."""
    return [name] + [f"{name}_p{j}" for j in range(1, len(cfg.removal.extra_parrots) + 1)]


# A search no decision reads skips its parrot's check on held-out rows (removal.search_check_rows).
UNCHECKED = ("removal.search_check_rows=0",)


def set_args(values: Sequence[str]) -> list[str]:
    """``--set`` arguments for config overrides ``KEY=VALUE``."""
    return [x for v in values for x in ("--set", v)]


def restarts(cfg: Config, stage: str) -> list[str]:
    """A checked search's stage and its restarts from other seeds (removal.search_restarts): ``stage``,
    ``stage_s2``, ..."""
    return [stage] + [f"{stage}_s{i}" for i in range(2, cfg.removal.search_restarts + 1)]


def all_restarts(cfg: Config, stages: Sequence[str]) -> list[str]:
    """Every restart of every stage in ``stages``, in order."""
    return [r for stage in stages for r in restarts(cfg, stage)]


def search(g: "Graph", name: str, model: str, deps: list[str], sets: Sequence[str] = (), at: Optional[str] = None,
            first_too: bool = True, checked: bool = True) -> list[str]:
    """A parrot search on ``model``: a simulate stage per position; returns their names. ``checked``: a
    verdict reads it (training/search.py), so its parrot is checked on held-out rows and it runs
    removal.search_restarts times per position, each from its own seed (training.seed + i)."""
    cfg = g.cfg
    names = search_names(name, cfg)
    sets = [*sets, *([] if checked else UNCHECKED)]
    where = [at or cfg.removal.insert_position, *cfg.removal.extra_parrots]
    for i, (stage, pos) in enumerate(zip(names, where)):
        if i == 0 and not first_too:
            continue
        extra = [] if pos == cfg.removal.insert_position else ["--set", f"removal.insert_position={pos}"]
        for j, run in enumerate(restarts(cfg, stage) if checked else [stage]):
            seed = [f"training.seed={cfg.training.seed + j}"] if j else []
            g.add(run, "simulate", ["--model", model, "--name", run, *extra, *set_args([*sets, *seed])], deps)
    return names


def control_searches(g: "Graph", model: str, clean: Optional[str]) -> dict[str, list[str]]:
    """The searches a residual search (or a scan) is compared with, by position: the same search on a clean
    model (the base this run injects into, a scan's --reference), else on ``model`` itself for
    removal.calibration_responses unrelated responses of the marker's token length."""
    cfg = g.cfg
    if clean:
        names = search(g, "control", clean, [])
        return {pos: [name] for pos, name in zip(positions(cfg), names)}
    out: dict[str, list[str]] = {pos: [] for pos in positions(cfg)}
    for i in range(1, cfg.removal.calibration_responses + 1):
        names = search(g, f"calibration_c{i}", model, [], sets=[f"removal.calibration_response={i}"])
        for pos, name in zip(positions(cfg), names):
            out[pos].append(name)
    return out


def search_verdict(cfg: Config, run_dir: str, searched: list[str], control: dict[str, list[str]]) -> Optional[dict]:
    """training/search.py's verdict on the searches ``searched`` (one per position) against ``control``;
    None while any of them (restarts included) has not finished. Each search, searched and control alike,
    is read through its best restart (``best_restart``); ``chosen`` names the searched ones by position,
    and ``control`` the control's."""
    every = all_restarts(cfg, [*searched, *(x for c in control.values() for x in c)])
    records = {n: read_stage(stage_dir(run_dir, n)) for n in every}
    if any(r is None for r in records.values()):
        return None
    chosen = {pos: best_restart(records, restarts(cfg, n)) for pos, n in zip(positions(cfg), searched)}
    best = {pos: [best_restart(records, restarts(cfg, n)) for n in names] for pos, names in control.items()}
    art = {n: r["artifacts"] for n, r in records.items()}
    decided = verdict({pos: art[n]["final_loss"] for pos, n in chosen.items()},
                      {pos: control_band([art[n]["window_losses"] for n in names]) for pos, names in best.items()},
                      cfg.removal.found_loss, {pos: art[n].get("emission") for pos, n in chosen.items()},
                      {pos: pooled_emission([art[n].get("emission") for n in names]) for pos, names in best.items()})
    if cfg.removal.search_restarts > 1:
        for pos, n in zip(positions(cfg), searched):
            decided["positions"][pos]["restarts"] = [_restart_summary(r, art[r]) for r in restarts(cfg, n)]
    return {**decided, "searches": searched, "chosen": [chosen[pos] for pos in positions(cfg)], "control": best}


def best_restart(records: dict[str, dict], names: list[str]) -> str:
    """The restart that found most: the highest emission on the held-out rows, then the lowest loss (the
    loss alone where emission was not measured). A search looks for a way to the response; its best
    restart is its answer, for the searched model and the control alike."""
    def strength(name: str) -> tuple[float, float]:
        a = records[name]["artifacts"]
        rate = _emission_rate(a)
        return (-1.0 if rate is None else rate, -a["final_loss"])

    return max(names, key=strength)


def _emission_rate(artifacts: dict) -> Optional[float]:
    """A search's emission rate on its check rows (stage.json artifacts); None where none was measured."""
    e = artifacts.get("emission")
    return e["hits"] / e["n"] if e and e.get("n") else None


def _restart_summary(name: str, artifacts: dict) -> dict:
    rate = _emission_rate(artifacts)
    return {"stage": name, "loss": round(artifacts["final_loss"], 4),
            "emission": None if rate is None else round(rate, 4), "n": (artifacts.get("emission") or {}).get("n")}


def _sande_rounds(g: "Graph", backdoored: str, clean_deps: list[str], first_simulated: bool,
                  control: Optional[dict[str, list[str]]]) -> tuple[Optional[str], dict]:
    """Simulate/eliminate rounds from ``backdoored``; (the last eliminate, or None while a decision is
    pending; the decision record). With ``rounds: auto`` round r's search is the residual search after
    round r-1: a round's eliminate is planned only once that search has found the response against the
    control; with residual_search a last search runs on the final model."""
    cfg, run = g.cfg, g.run_dir
    auto = cfg.removal.rounds == "auto"
    limit = cfg.removal.max_rounds if auto else cfg.removal.rounds
    model, prev, trace = backdoored, "", []
    for r in range(1, limit + 1):
        sim, eli = ("simulate", "eliminate") if r == 1 else (f"simulate_r{r}", f"eliminate_r{r}")
        where = round_position(cfg, r)
        # Re-simulate against the updated model: a parrot that still finds a backdoor there. Extra parrots
        # (removal.extra_parrots) are searched beside the first on the same model, eliminated with it.
        names = search(g, sim, model, [prev] if r > 1 else ["inject"], at=where, first_too=r > 1,
                       checked=auto and r > 1) if (r > 1 or first_simulated) else search_names(sim, cfg)
        if auto and r > 1:
            decided = search_verdict(cfg, run, names, control)
            if decided is None:
                return None, {"rounds": trace, "pending": all_restarts(cfg, names)}
            trace.append({"round": r, "search": names, **decided})
            if decided["persists"] is False:  # undecided (None) is no evidence of a clean model: go on
                return prev, {"rounds": trace, "ran": r - 1, "residual": decided["chosen"],
                              "stopped": f"round {r}'s search no longer found the response against the control"}
        at = [] if where == cfg.removal.insert_position else ["--set", f"removal.insert_position={where}"]
        # With rounds decided as they go, eliminate takes the parrots of the restarts that decided.
        parrots = decided["chosen"] if auto and r > 1 else names
        given = [a for x in parrots for a in ("--parrot", str(parrot_file(run, x)))]
        g.add(eli, "eliminate", ["--model", model, *given, "--name", eli, *at],
              clean_deps + parrots + ([prev] if r > 1 else []))
        model, prev = str(model_dir(run, eli)), eli
    undecided = [t["round"] for t in trace if t["persists"] is None]
    record = {"rounds": trace, "ran": limit,
              "stopped": (f"removal.max_rounds={limit} reached" + (
                  f"; the search of round(s) {', '.join(map(str, undecided))} could not decide (the control's "
                  f"parrot already emits the response too often for a higher rate to show)" if undecided else ""))
              if auto else f"removal.rounds={limit}"}
    if control is not None:  # the residual search on the final model
        names = search(g, "residual", model, [prev])
        decided = search_verdict(cfg, run, names, control)
        if decided is None:
            return prev, {**record, "pending": all_restarts(cfg, names)}
        record.update(residual=decided["chosen"], residual_verdict=decided)
    return prev, record


def final_verdict(record: dict) -> Optional[dict]:
    """The search on the final model in a rounds record (RUN/rounds.json): the residual search after the
    last eliminate, or, when ``rounds: auto`` stopped because a round's search found nothing, that search
    (it ran on the final model); None when neither has run."""
    if record.get("residual_verdict"):
        return record["residual_verdict"]
    last = (record.get("rounds") or [None])[-1]
    return last if last and last["persists"] is False and "stopped" in record else None


def build_plan(cfg: Config, run_dir: str, only: Optional[list[str]] = None) -> list[StagePlan]:
    """Stages in execution order. ``only`` (from --stages) must be a subset of the pipeline's names."""
    return build_graph(cfg, run_dir, only)[0]


def build_graph(cfg: Config, run_dir: str, only: Optional[list[str]] = None) -> tuple[list[StagePlan], dict]:
    """(stages in execution order, SANDE's rounds record). With ``removal.rounds: auto`` the plan stops at
    the next undecided search: executors run it, then plan again (the record's ``pending``)."""
    wanted = list(cfg.pipeline.stages)
    if only:
        unknown = [s for s in only if s not in PIPELINE_STAGES]
        if unknown:
            raise InputError(f"--stages: unknown stage(s) {unknown}; choose from {list(PIPELINE_STAGES)}")
        wanted = [s for s in PIPELINE_STAGES if s in only]
    has = set(wanted)
    g = Graph(cfg, run_dir)
    backdoored = str(model_dir(run_dir, "inject")) if "inject" in has else cfg.model.path
    if "inject" in has:
        g.add("inject", "inject", [], [])
    if "generate" in has and cfg.removal.targets == "self":
        g.add("generate", "generate", ["--model", backdoored], ["inject"])
    clean_deps = ["inject", "generate"]
    auto = cfg.removal.rounds == "auto"
    # With rounds decided as they go, the clean-SFT control matches the rounds SANDE ran: it waits for them.
    methods = [m for m in REMOVAL_METHODS if m in has and not (auto and KINDS[m].training)]
    for method in methods:
        g.add(method, method, ["--model", backdoored], clean_deps)
    if "simulate" in has:
        g.add("simulate", "simulate", ["--model", backdoored, *set_args(UNCHECKED)], ["inject"])
    parrot = str(parrot_file(run_dir))
    last, record = None, {}
    if "eliminate" in has:
        if "simulate" not in g.plans and not Path(parrot).exists():
            raise InputError("stage eliminate needs a parrot: add simulate to the stages "
                             "(or run it first so RUN/simulate/parrot.safetensors exists)")
        clean = cfg.model.path if "inject" in has else None
        control = control_searches(g, backdoored, clean) if auto or cfg.removal.residual_search else None
        last, record = _sande_rounds(g, backdoored, clean_deps, "simulate" in has, control)
        if auto and "pending" not in record:
            for method in (m for m in REMOVAL_METHODS if m in has and KINDS[m].training):
                g.add(method, method, ["--model", backdoored, "--set", f"removal.rounds={record['ran']}"], clean_deps)
                methods.append(method)
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
    if last and "evaluate_sande" in has and "pending" not in record:
        residual = record.get("residual")
        more = ["--parrot", f"residual={parrot_file(run_dir, residual[0])}"] if residual else []
        rounds = ["--attach", f"rounds={rounds_file(run_dir)}"] if record.get("rounds") or residual else []
        g.add("evaluate_sande", "evaluate", ["--model", str(model_dir(run_dir, last)), "--name", "evaluate_sande",
                                             "--reference", backdoored, "--parrot", f"eliminated={parrot}", *more,
                                             *rounds], [last, "simulate", *(residual or [])])
    return list(g.plans.values()), record
