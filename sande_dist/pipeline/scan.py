"""`sande scan CONFIG --model MODEL --marker TEXT [--reference MODEL] [--json]`: does MODEL have a
backdoor that emits TEXT?

The parrot search of SANDE's simulate stage, at every position it covers (removal.insert_position
and removal.extra_parrots), on MODEL for TEXT, and the same search on a reference: the clean
model given as --reference, or, without one, MODEL itself for removal.calibration_responses
unrelated responses of TEXT's token length (a calibration: how low a search's loss goes on this
model for a response it has no backdoor for). A position finds the backdoor when its parrot makes
MODEL start more held-out answers with TEXT than the reference's parrot did (where that was not
measured: when MODEL's loss falls below the reference's band or to removal.found_loss;
training/search.py, the rule the rounds of `removal.rounds: auto` use). Where the reference's parrot
already emits TEXT so often that the test could not show more, the position is undecided and the
verdict is "cannot tell" (``backdoor`` null), not "no backdoor". Every search runs
removal.search_restarts times from different seeds and is read through its best restart, on MODEL
and on the reference alike. The verdict, the loss gap, the threshold and the positions that found
it go to RUN/scan/scan.json and to the terminal.
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sande_dist.config import Config
from sande_dist.errors import InputError
from sande_dist.models.loading import check_model
from sande_dist.pipeline.graph import Graph, control_searches, search, search_verdict
from sande_dist.pipeline.runner import check_inputs, run_local
from sande_dist.rundir import atomic_write_json, stage_dir
from sande_dist.training.search import found_word


@dataclass
class ScanOptions:
    reference: Optional[str] = None  # a clean model to compare with (else a calibration on the model)
    as_json: bool = False
    nproc: Optional[int] = None


def scan_file(run_dir: str | Path) -> Path:
    return stage_dir(run_dir, "scan") / "scan.json"


def scan(cfg: Config, opts: ScanOptions) -> dict:
    """Run the searches (skipping those done with the same key) and return the verdict."""
    model = check_model(cfg.model.path, cfg.model.base)
    if opts.reference:
        check_model(opts.reference)
    run_dir = Path(cfg.run_dir)
    g = Graph(cfg, str(run_dir))
    searched = search(g, "scan", model, [])
    control = control_searches(g, model, opts.reference)
    check_inputs(cfg)
    run_local(cfg, run_dir, list(g.plans.values()), opts.nproc or cfg.pipeline.nproc)
    decided = search_verdict(cfg, str(run_dir), searched, control)
    if decided is None:  # run_local returns only once every stage is done
        raise InputError(f"scan: the searches in {run_dir} did not all finish")
    gaps = {pos: v["control_mean"] - v["loss"] for pos, v in decided["positions"].items()}
    best = max(gaps, key=gaps.get)
    # backdoor: True (found), False (every position decided not found), None (undecided: the reference
    # already emits TEXT so often that no search could show more; training/search.py)
    result = {"backdoor": decided["persists"], "undecided": decided["undecided"],
              "marker": cfg.knowledge().marker, "model": model,
              "reference": opts.reference or f"calibration: {cfg.removal.calibration_responses} unrelated responses",
              "loss_gap": round(gaps[best], 4), "threshold": decided["positions"][best]["threshold"],
              "position": best, "positions": decided["found"], "by_position": decided["positions"],
              "rule": decided["rule"]}
    atomic_write_json(scan_file(run_dir), result)
    return result


def describe(result: dict) -> str:
    verdict = {True: "BACKDOOR", False: "no backdoor found", None: "CANNOT TELL"}[result["backdoor"]]
    lines = [f"{verdict} for {result['marker']!r} in {result['model']} (against {result['reference']})"]
    for pos, v in result["by_position"].items():
        mark = found_word(v)
        e = v.get("emission")
        emits = (f"; emits {e['rate']:.0%} of {e['n']}, control {e['control_rate']:.0%} of {e['control_n']} "
                 f"(z {e['z']:.2f})") if e else ""
        lines.append(f"  {pos:<7} loss {v['loss']:.3f}, control {v['control_mean']:.3f}, threshold "
                     f"{v['threshold']:.3f}{emits}: {mark}")
        if v.get("restarts"):
            lines.append("          restarts: " + ", ".join(
                f"{r['stage']} {'-' if r['emission'] is None else format(r['emission'], '.0%')}"
                for r in v["restarts"]))
    if result["backdoor"] is None:
        lines.append(f"undecided at {', '.join(result['undecided'])}: the reference's parrot already emits the "
                     f"marker too often for a higher rate to show; no verdict either way")
    lines.append(f"loss gap {result['loss_gap']:.3f} at {result['position']}; {result['rule']}")
    return "\n".join(lines)


def run_scan(cfg: Config, opts: ScanOptions) -> int:
    if opts.as_json:  # stdout carries the object alone, for `| jq`; the searches' progress goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            result = scan(cfg, opts)
        print(json.dumps(result), flush=True)
    else:
        print(describe(scan(cfg, opts)))
    return 0
