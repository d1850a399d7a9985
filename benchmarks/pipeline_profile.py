"""Where a pipeline's time and disk writes go, per stage: start-up, compute, checkpoint/export I/O, bytes.

Runs `sande demo` (or `sande run CONFIG`) into a fresh run directory, then reads
what every stage recorded: its phases (``stage.json`` ``timings``), its wall time
as the executor saw it (``pipeline.json`` ``wall_s``: the launcher's and the
process's start-up are only visible there) and the bytes it wrote (checkpoints,
which are deleted when the stage is done, and artifacts). The whole run's bytes
written come from the kernel's accounting of every process it started.

    python benchmarks/pipeline_profile.py --run-dir /tmp/profile [--config CONFIG] [--set k=v ...]
    python benchmarks/pipeline_profile.py --from-run runs/demo      # an existing run, nothing is run

Prints one JSON object (and writes it to --out when given).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from emit import emit  # benchmarks/emit.py

# Phases that make start-up, compute and I/O (training stages and evaluations name them differently).
STARTUP = ("imports", "inputs", "setup", "engine", "resume", "engine_start", "utility_engine_start")
COMPUTE = ("compute", "loop_other", "generate", "utility", "engine_other", "extras")
IO = ("checkpoint", "export", "report")


def stage_profile(stage_dir: Path) -> dict | None:
    try:
        record = json.loads((stage_dir / "stage.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    try:
        key = json.loads((stage_dir / "pipeline.json").read_text())
    except (OSError, json.JSONDecodeError):
        key = {}
    timings = record.get("timings", {})
    in_process = sum(timings.values())
    wall = key.get("wall_s", record.get("wall_time_s"))
    launcher = max(0.0, wall - in_process) if wall is not None and timings else 0.0
    written = record.get("bytes_written", {})
    out = {
        "wall_s": wall,
        "startup_s": round(launcher + sum(timings.get(k, 0.0) for k in STARTUP), 2),
        "compute_s": round(sum(timings.get(k, 0.0) for k in COMPUTE), 2),
        "io_s": round(sum(timings.get(k, 0.0) for k in IO), 2),
        "launcher_and_exit_s": round(launcher, 2),
        "phases": timings,
        "bytes_checkpoints": written.get("checkpoints", 0),
        "bytes_artifacts": written.get("artifacts", 0),
        "steps": record.get("steps"),
    }
    out["bytes_written"] = out["bytes_checkpoints"] + out["bytes_artifacts"]
    return out


def profile_run(run_dir: Path) -> dict:
    stages = {}
    for stage_dir in sorted(run_dir.iterdir(), key=lambda p: (p / "stage.json").stat().st_mtime
                            if (p / "stage.json").exists() else 0):
        if stage_dir.is_dir() and (found := stage_profile(stage_dir)) is not None:
            stages[stage_dir.name] = found
    sums = {k: round(sum(s[k] for s in stages.values()), 1) for k in ("startup_s", "compute_s", "io_s")}
    sums["bytes_written"] = sum(s["bytes_written"] for s in stages.values())
    sums["bytes_checkpoints"] = sum(s["bytes_checkpoints"] for s in stages.values())
    return {"stages": stages, "totals": sums}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", help="a new run directory for the profiled run (removed first)")
    ap.add_argument("--from-run", help="profile an existing run directory instead of running")
    ap.add_argument("--config", help="`sande run CONFIG` instead of `sande demo`")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    if bool(args.run_dir) == bool(args.from_run):
        ap.error("give exactly one of --run-dir and --from-run")
    result: dict = {}
    if args.run_dir:
        run = Path(args.run_dir)
        shutil.rmtree(run, ignore_errors=True)
        sets = [x for o in args.overrides for x in ("--set", o)]
        cmd = [sys.executable, "-m", "sande_dist.cli"]
        cmd += ["run", args.config, "--run-dir", str(run), *sets] if args.config else \
            ["demo", "--run-dir", str(run), *sets]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        blocks = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock - before
        result.update({"command": " ".join(cmd[2:]), "wall_s": round(wall, 1),
                       # 512-byte blocks the kernel accounted to every process of the run (deleted files included)
                       "bytes_written_kernel": blocks * 512})
    else:
        run = Path(args.from_run)
    result.update(profile_run(run))
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
