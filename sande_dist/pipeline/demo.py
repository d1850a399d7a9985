"""`sande demo`: the embedded default end to end on CPU.

SmolLM2-135M-Instruct and the cached Alpaca data: inject a backdoor, remove it with
OSFT (trigger known) and with SANDE (trigger unknown) from the same backdoored
model, evaluate every model, print the table and write report.md / report.png.
Rerunning the same command resumes: finished stages are skipped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sande_dist import resources
from sande_dist.config import resolve_config
from sande_dist.pipeline.graph import build_plan
from sande_dist.pipeline.runner import check_inputs, finish_report, run_local

DEMO_CONFIG = resources.path("configs", "demo.yaml")

# A smoke run of every stage: small data, few steps, few prompts. Not a result.
QUICK = [
    "data.num_rows=48",
    "training.max_steps=4",
    "training.inject.max_steps=6",
    "training.simulate.max_steps=4",
    "eval.num_prompts=16",
    "eval.utility_limit=20",
    "eval.utility_tasks=[arc_easy]",
]


@dataclass
class DemoOptions:
    run_dir: str = "runs/demo"
    quick: bool = False  # a smoke run of every stage
    overrides: list[str] = field(default_factory=list)  # --set, after the quick settings


def run_demo(opts: DemoOptions) -> int:
    cfg = resolve_config(DEMO_CONFIG, (QUICK if opts.quick else []) + list(opts.overrides), run_dir=opts.run_dir)
    run_dir = Path(cfg.run_dir)
    print(f"sande demo: {cfg.model.path}, triggers {cfg.attack.triggers}, marker {cfg.attack.marker!r}, "
          f"run dir {run_dir}{' (quick)' if opts.quick else ''}")
    started = time.time()
    check_inputs(cfg)
    run_local(cfg, run_dir, build_plan(cfg, str(run_dir)), cfg.pipeline.nproc)
    finish_report(run_dir)
    print(f"sande demo: finished in {time.time() - started:.0f}s; report in {run_dir / 'report.md'}")
    return 0
