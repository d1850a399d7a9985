"""`sande run`: execute the stage graph, each stage its own process group.

Training stages run under torchrun (gloo on CPU, nccl on GPU); generation and
evaluation run as a plain process, so vLLM and DeepSpeed never share one.
A stage is skipped when its stage.json exists and its pipeline key is unchanged;
a stage killed midway resumes from its own checkpoint when run again.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sande_dist.config import Config
from sande_dist.distributed.process_group import free_port
from sande_dist.errors import InputError, StageError
from sande_dist.pipeline.graph import StagePlan, build_plan
from sande_dist.rundir import atomic_write_text, forget, is_done, log_file, read_stage, stage_dir, write_key


@dataclass
class RunOptions:
    """`sande run`'s flags."""

    stages: Optional[list[str]] = None  # --stages: a subset of the pipeline's stage names
    executor: str = "local"  # local | slurm
    nproc: Optional[int] = None  # training ranks per node (default pipeline.nproc)
    dry_run: bool = False  # slurm: render the job scripts, submit nothing


def stage_command(plan: StagePlan, config_path: str, run_dir: str, nproc: int) -> list[str]:
    argv = plan.argv(config_path, run_dir)
    if not plan.distributed:
        return [sys.executable, "-m", "sande_dist.cli", *argv]
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "sande_dist.cli", *argv]


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


def check_inputs(cfg: Config) -> None:
    """What a pipeline reads from the user, checked before any stage starts: bad input is an exit-2
    error in seconds, not a failed stage minutes in."""
    from sande_dist.data.stages import base_samples
    from sande_dist.evaluation.stage import eval_samples
    from sande_dist.evaluation.utility import check_tasks
    from sande_dist.models.loading import check_model

    check_model(cfg.model.path)
    base_samples(cfg)
    eval_samples(cfg)
    check_tasks(cfg.eval.utility_tasks)


def _run_one(plan: StagePlan, run_dir: Path, config_path: Path, nproc: int, tag: str, echo) -> None:
    out = stage_dir(run_dir, plan.name)
    out.mkdir(parents=True, exist_ok=True)
    forget(run_dir, plan.name)  # a changed key: this stage is stale
    log = log_file(run_dir, plan.name)
    ranks = nproc if plan.distributed else 1
    cmd = stage_command(plan, str(config_path), str(run_dir), ranks)
    started = time.time()
    echo(f"{tag} running ({'torchrun x' + str(nproc) if plan.distributed else 'one process'}), log {log}")
    # The key goes first: stage.json (written last by the stage) then marks this key done, even
    # when this runner is killed between the stage's end and its own next line.
    write_key(run_dir, plan.name, plan.key, command=cmd)
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=stage_env(ranks)).returncode
    if rc != 0 or read_stage(out) is None:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        if rc == 2:  # the stage refused its input: the user's to fix, as for any other command
            raise InputError(f"stage {plan.name}: bad input; see {log}\n{tail}")
        raise StageError(f"stage {plan.name} failed (exit {rc}); see {log}\n{tail}")
    wall = time.time() - started
    # The launcher's share of the stage's time is only visible here (benchmarks/pipeline_profile.py).
    write_key(run_dir, plan.name, plan.key, command=cmd, wall_s=round(wall, 2), ranks=ranks)
    echo(f"{tag} done in {wall:.0f}s")


def run_local(cfg: Config, run_dir: Path, plans: list[StagePlan], nproc: int, echo=print) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    atomic_write_text(config_path, cfg.to_yaml())
    width = len(str(len(plans)))
    for i, plan in enumerate(plans, 1):
        tag = f"[{i:>{width}}/{len(plans)}] {plan.name:<20}"
        if is_done(run_dir, plan.name, plan.key):
            echo(f"{tag} done earlier, skipped")
            continue
        _run_one(plan, run_dir, config_path, nproc, tag, echo)


def finish_report(run_dir: Path, echo=print) -> None:
    from sande_dist.evaluation.report import write_run_report

    md = write_run_report(run_dir)
    if md is not None:
        echo("")
        echo(md.read_text())


def run_pipeline(cfg: Config, opts: RunOptions) -> int:
    """`sande run CONFIG`: every stage of the graph, locally or as Slurm jobs."""
    run_dir = Path(cfg.run_dir)
    plans = build_plan(cfg, str(run_dir), opts.stages)
    if opts.executor == "slurm":
        from sande_dist.pipeline.slurm import submit_pipeline

        return submit_pipeline(cfg, run_dir, plans, dry_run=opts.dry_run, nproc=opts.nproc)
    check_inputs(cfg)
    run_local(cfg, run_dir, plans, opts.nproc or cfg.pipeline.nproc)
    finish_report(run_dir)
    return 0
