"""`sande status RUN [--json]`: every stage of a run's graph and where it stands.

States: ``done``; ``running`` (step x of y, loss, ETA, from the stage's metrics); ``queued``
(launched in a batch, or a Slurm job not yet running); ``failed`` (the log and its last lines);
``not started``. A local run is alive while its executor's process is (RUN/executor.json); a
Slurm run's jobs are asked of squeue (RUN/slurm/jobs.json). Reads files only: safe at any time.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from sande_dist.config import load_config
from sande_dist.errors import InputError
from sande_dist.pipeline.graph import build_graph
from sande_dist.pipeline.progress import stage_progress
from sande_dist.rundir import (KEY_FILE, executor_file, is_done, live_executor, log_file, log_tail, read_stage,
                               slurm_dir, stage_dir)


def _slurm_states(run_dir: Path) -> dict[str, tuple[str, str]]:
    """stage -> (job id, squeue state or "gone") for the jobs this run submitted."""
    ledger_path = slurm_dir(run_dir) / "jobs.json"
    if not ledger_path.exists():
        return {}
    ledger = json.loads(ledger_path.read_text())
    states = {}
    if shutil.which("squeue"):
        out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ledger.values())],
                             capture_output=True, text=True).stdout
        states = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
    return {stage: (job, states.get(job, "gone").strip()) for stage, job in ledger.items()}


def stage_states(run_dir: str | Path) -> list[dict]:
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.exists():
        config = slurm_dir(run_dir) / "config.yaml"
    if not config.exists():
        raise InputError(f"{run_dir}: no config.yaml (not a run directory of `sande run`)")
    cfg = load_config(config)
    executor = json.loads(executor_file(run_dir).read_text()) if executor_file(run_dir).exists() else {}
    # the graph as the executor planned it (the same run dir spelling, the same --stages)
    plans, record = build_graph(cfg, executor.get("run_dir", str(run_dir)), executor.get("only"))
    local_alive = live_executor(run_dir) is not None
    jobs = _slurm_states(run_dir)
    out = []
    for plan in plans:
        row: dict = {"stage": plan.name, "kind": plan.kind}
        folder = stage_dir(run_dir, plan.name)
        launched = (folder / KEY_FILE).exists()
        if is_done(run_dir, plan.name, plan.key):
            row["state"] = "done"
            row["wall_s"] = (read_stage(folder) or {}).get("wall_time_s")
        elif plan.name in jobs and jobs[plan.name][1] != "gone":
            job, state = jobs[plan.name]
            row.update(state="running" if state == "RUNNING" else "queued", job=job, slurm_state=state)
        elif launched and local_alive and not jobs:
            row["state"] = "running" if log_file(run_dir, plan.name).exists() else "queued"
        elif launched and (log := log_file(run_dir, plan.name)).exists():
            row.update(state="failed", log=str(log), last_lines=log_tail(log))
        else:
            row["state"] = "not started"
        if plan.name in jobs:
            row["job"] = jobs[plan.name][0]
        if row["state"] == "running" and (progress := stage_progress(run_dir, plan.name)) is not None:
            row["progress"] = progress
        out.append(row)
    if record.get("pending"):
        out.append({"stage": "(rounds)", "kind": "decision", "state": "pending",
                    "waits_for": record["pending"], "note": "the next round is planned once these searches finish"})
    return out


def describe(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        text = f"{row['stage']:<22} {row['state']}"
        if "progress" in row:
            p = row["progress"]
            text += f": step {p['step']} of {p['of']}, loss {p['loss']:.3f}, ETA {p['eta_s']:.0f}s"
        if "job" in row:
            text += f" (job {row['job']}{', ' + row['slurm_state'] if 'slurm_state' in row else ''})"
        if row["state"] == "failed":
            text += f": see {row['log']}" + "".join(f"\n    {x}" for x in row["last_lines"])
        lines.append(text)
    return "\n".join(lines)


def show_status(run_dir: str, as_json: bool = False) -> int:
    rows = stage_states(run_dir)
    print(json.dumps({"run_dir": str(run_dir), "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": rows})
          if as_json else describe(rows))
    return 0
