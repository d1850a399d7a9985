"""`sande remove CONFIG --model M --marker TEXT [--trigger T ...]`: clean one's own model.

The defender has a model they suspect and the response its backdoor emits; no attack to inject.
What they know goes into the config's defender section (from_attack: false), and the method
follows from it: OSFT when a trigger is known, SANDE otherwise (SANDE-P when part of the trigger
or of the response is known). The model is evaluated before (evaluate_backdoored) and after
(evaluate_osft or evaluate_sande); with SANDE the residual search and its calibration show whether
a parrot can still find the response. The defender's rows are removal.data, else data.train from
its first row (nothing is poisoned here). Everything lands in the run directory as with `sande run`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional

from sande_dist.config import Config, resolve_config
from sande_dist.pipeline.runner import RunOptions, run_pipeline
from sande_dist.rundir import report_file


@dataclass
class RemoveOptions:
    model: str
    marker: str
    triggers: list[str] = field(default_factory=list)
    known_trigger: Optional[str] = None
    known_response: Optional[str] = None
    executor: str = "local"
    nproc: Optional[int] = None
    dry_run: bool = False


def removal_config(config: Optional[str], overrides: list[str], run_dir: Optional[str], opts: RemoveOptions) -> Config:
    """The config file, its overrides, and what the defender knows; the method's stages."""
    knows = ["defender.from_attack=false", f"defender.marker={json.dumps(opts.marker)}",
             f"defender.triggers={json.dumps(opts.triggers) if opts.triggers else 'null'}",
             f"defender.known_trigger={json.dumps(opts.known_trigger) if opts.known_trigger else 'null'}",
             f"defender.known_response={json.dumps(opts.known_response) if opts.known_response else 'null'}"]
    method = ["osft", "evaluate_osft"] if opts.triggers else ["simulate", "eliminate", "evaluate_sande"]
    stages = f"pipeline.stages={json.dumps(['evaluate_backdoored', *method])}"
    cfg = resolve_config(config, [*overrides, *knows, stages], run_dir=run_dir, model=opts.model)
    if not cfg.removal.data:  # the defender's own rows, from the first (no inject took any)
        cfg.removal.data = cfg.data.train
    if not opts.triggers:  # the evidence without a trigger to test: a search on the cleaned model
        cfg.removal.residual_search = True
    return cfg


def run_remove(config: Optional[str], overrides: list[str], run_dir: Optional[str], opts: RemoveOptions) -> int:
    cfg = removal_config(config, overrides, run_dir, opts)
    how = "OSFT (trigger known)" if opts.triggers else \
        "SANDE-P" if (opts.known_trigger or opts.known_response) else "SANDE (trigger unknown)"
    print(f"sande remove: {cfg.model.path}, marker {opts.marker!r}: {how}; run dir {cfg.run_dir}")
    code = run_pipeline(cfg, RunOptions(executor=opts.executor, nproc=opts.nproc, dry_run=opts.dry_run))
    after = "evaluate_osft" if opts.triggers else "evaluate_sande"
    if code == 0 and opts.executor == "local" and report_file(cfg.run_dir, after).exists():
        final = json.loads(report_file(cfg.run_dir, after).read_text())["model"]
        print(f"sande remove: cleaned model {final}; report {cfg.run_dir}/report.md")
    return code
