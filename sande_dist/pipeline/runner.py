"""`sande run`: execute the stage graph, each stage its own process group.

Training stages run under torchrun (gloo on CPU, nccl on GPU); generation and
evaluation run as a plain process, so vLLM and DeepSpeed never share one.
A stage is skipped when its stage.json exists and its pipeline key is unchanged;
a stage killed midway resumes from its own checkpoint when run again.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from sande_dist.config import Config
from sande_dist.errors import StageError
from sande_dist.pipeline.graph import StagePlan, build_plan
from sande_dist.rundir import atomic_write_json, atomic_write_text, read_stage

KEY_FILE = "pipeline.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_done(run_dir: Path, plan: StagePlan) -> bool:
    """Done: stage.json exists and pipeline.json holds plan.key (any object with .name and .key; the
    Slurm executor passes its jobs, whose batch script writes pipeline.json)."""
    stage_dir = run_dir / plan.name
    if read_stage(stage_dir) is None:
        return False
    try:
        return json.loads((stage_dir / KEY_FILE).read_text()).get("key") == plan.key
    except (OSError, json.JSONDecodeError):
        return False


def stage_command(plan: StagePlan, config_path: str, run_dir: str, nproc: int) -> list[str]:
    argv = plan.argv(config_path, run_dir)
    if not plan.distributed:
        return [sys.executable, "-m", "sande_dist.cli", *argv]
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(_free_port()), "-m", "sande_dist.cli", *argv]


def stage_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Ranks share the cores: without this each rank spawns one thread per core.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_local(cfg: Config, run_dir: Path, plans: list[StagePlan], nproc: int, echo=print) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    atomic_write_text(config_path, cfg.to_yaml())
    width = len(str(len(plans)))
    for i, plan in enumerate(plans, 1):
        tag = f"[{i:>{width}}/{len(plans)}] {plan.name:<20}"
        if is_done(run_dir, plan):
            echo(f"{tag} done earlier, skipped")
            continue
        stage_dir = run_dir / plan.name
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "stage.json").unlink(missing_ok=True)  # a changed key: this stage is stale
        log = stage_dir / "log.txt"
        ranks = nproc if plan.distributed else 1
        cmd = stage_command(plan, str(config_path), str(run_dir), ranks)
        env = stage_env(ranks)
        started = time.time()
        echo(f"{tag} running ({'torchrun x' + str(nproc) if plan.distributed else 'one process'}), log {log}")
        # The key goes first: stage.json (written last by the stage) then marks this key done, even
        # when this runner is killed between the stage's end and its own next line.
        atomic_write_json(stage_dir / KEY_FILE, {"key": plan.key, "command": cmd})
        with open(log, "a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0 or read_stage(stage_dir) is None:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise StageError(f"stage {plan.name} failed (exit {rc}); see {log}\n{tail}")
        echo(f"{tag} done in {time.time() - started:.0f}s")


def finish_report(run_dir: Path, echo=print) -> None:
    from sande_dist.evaluation.report import write_run_report

    write_run_report(run_dir)
    md = run_dir / "report.md"
    if md.exists():
        echo("")
        echo(md.read_text())


def main(args) -> int:
    from sande_dist.cli import resolve_config

    cfg = resolve_config(args)
    run_dir = Path(cfg.run_dir)
    nproc = args.nproc or cfg.pipeline.nproc
    only = args.stages.split(",") if args.stages else None
    plans = build_plan(cfg, str(run_dir), only)
    if args.executor == "slurm":
        from sande_dist.pipeline.slurm import submit_pipeline

        return int(submit_pipeline(cfg, run_dir, plans, dry_run=args.dry_run, nproc=args.nproc) or 0)
    run_local(cfg, run_dir, plans, nproc)
    finish_report(run_dir)
    return 0
