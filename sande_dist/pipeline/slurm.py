"""The Slurm executor: one batch job per stage, chained with --dependency=afterok.

Each job is a copy of a template in `slurm/` (train.sbatch for distributed
stages, eval.sbatch for one-process stages) with two blocks filled in: the
#SBATCH lines from the `slurm` config section, and a settings block of shell
assignments, every value passed through shlex.quote. The stage's command line
becomes the script's positional arguments (`set -- ...`), so the templates run
any command (`sande <stage>`).

Stages are marked done as the local executor marks them (rundir.is_done): the
job writes RUN/<stage>/pipeline.json {"key": <plan key>} once the stage has
written its stage.json, and a rerun skips a stage only when that key matches
the current plan's; a stale stage.json is removed before its stage is submitted
again. A rerun also reuses jobs of an earlier submission that are still queued
or running (RUN/slurm/jobs.json).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from sande_dist import resources
from sande_dist.config import Config
from sande_dist.errors import InputError, StageError
from sande_dist.rundir import (STAGE_FILE, atomic_write_json, atomic_write_text, forget, rounds_file, slurm_dir,
                               stage_dir)
from sande_dist.rundir import is_done as key_done
# squeue states of a job that may still run; anything else is finished or gone.
ALIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING",
                "COMPLETING", "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT"}
# sbatch reads #SBATCH values itself (no shell), so a value only has to stay on its line and be one word.
_SBATCH_VALUE = re.compile(r"^[^\s'\"\\]+$")
# The job writes the key into JSON with printf: it must need no escaping.
_KEY = re.compile(r"^[0-9A-Za-z_.-]*$")


@dataclass
class SlurmJob:
    """One batch job: ``args`` follow torchrun (distributed) or python (one process).

    ``key`` is the stage's pipeline key (graph.StagePlan.key); without one, an
    existing stage.json alone counts as done.
    """

    name: str
    distributed: bool
    args: list[str]
    deps: list[str] = field(default_factory=list)
    key: str = ""


def jobs_from_plans(plans, config_path: Path, run_dir: Path) -> list[SlurmJob]:
    """Slurm jobs for graph.StagePlans: `python -m sande_dist.cli <stage> CONFIG --run-dir RUN ...`."""
    return [SlurmJob(p.name, p.distributed, ["-m", "sande_dist.cli", *p.argv(str(config_path), str(run_dir))],
                     list(p.deps), p.key) for p in plans]


# The key of a job that plans the next round: never "done" (it runs again whenever it is not queued).
NEXT_ROUND = "next-round"


def is_done(run_dir: Path, job: SlurmJob) -> bool:
    """The local executor's rule (rundir.is_done): stage.json exists and pipeline.json holds this key."""
    if job.key == NEXT_ROUND:
        return False
    if not job.key:
        return (stage_dir(run_dir, job.name) / STAGE_FILE).exists()
    return key_done(run_dir, job.name, job.key)


def _sbatch_value(key: str, value: object) -> str:
    text = str(value)
    if not _SBATCH_VALUE.match(text):
        where = key if key.startswith("run_dir") else f"slurm.{key}"
        raise InputError(f"{where}: {text!r} cannot go on an #SBATCH line "
                         "(no spaces, quotes, backslashes or newlines)")
    return text


def sbatch_directives(cfg: Config, job: SlurmJob, run_dir: Path) -> list[str]:
    s = cfg.slurm
    opts = [f"--job-name=sande-{_sbatch_value('run_dir name', run_dir.name)}-{job.name}",
            f"--output={_sbatch_value('run_dir', slurm_dir(run_dir))}/{job.name}-%j.out"]
    if job.distributed:
        opts += [f"--nodes={s.nodes}", f"--time={_sbatch_value('time', s.time)}",
                 f"--signal=B:USR1@{s.signal_seconds}"]
    else:
        opts += ["--nodes=1", f"--time={_sbatch_value('eval_time', s.eval_time)}"]
    if s.gpus_per_node:
        opts.append(f"--gpus-per-node={s.gpus_per_node}")
    for key in ("partition", "account", "qos", "cpus_per_task", "mem"):
        value = getattr(s, key)
        if value is not None:
            opts.append(f"--{key.replace('_', '-')}={_sbatch_value(key, value)}")
    for extra in s.extra_sbatch:
        if not extra.startswith("-"):
            raise InputError(f"slurm.extra_sbatch: {extra!r} is not an sbatch option (e.g. --exclusive)")
        opts.append(_sbatch_value("extra_sbatch", extra))
    return [f"#SBATCH {o}" for o in opts]


def _assign(name: str, value: object) -> str:
    return f"{name}={shlex.quote(str(value))}"


def render(cfg: Config, job: SlurmJob, run_dir: Path, nproc: Optional[int] = None) -> str:
    """The batch script for ``job``: its template with the #SBATCH and settings blocks filled in."""
    s = cfg.slurm
    template = resources.path("slurm", "train.sbatch" if job.distributed else "eval.sbatch")
    if not template.is_file():
        raise InputError(f"Slurm template {template} not found (the slurm/ folder of sande-dist is incomplete; "
                         "reinstall the package)")
    srun_extra = []
    if s.container_image:
        srun_extra.append(f"--container-image={s.container_image}")
    if s.container_mounts:
        srun_extra.append(f"--container-mounts={s.container_mounts}")
    if not _KEY.match(job.key):
        raise StageError(f"stage {job.name}: key {job.key!r} is not a plain word")
    settings = [f"# Rendered by sande for stage {job.name}; every value below is shell-quoted.",
                _assign("PYTHON", s.python or sys.executable),
                # A job that plans the next round is no stage: nothing marks it done.
                _assign("STAGE_DONE", "" if job.key == NEXT_ROUND else stage_dir(run_dir, job.name) / STAGE_FILE),
                _assign("STAGE_KEY", "" if job.key == NEXT_ROUND else job.key),
                "SRUN_EXTRA=(" + " ".join(shlex.quote(a) for a in srun_extra) + ")"]
    if job.distributed:
        settings += [_assign("NPROC_PER_NODE", s.gpus_per_node or nproc or cfg.pipeline.nproc),
                     _assign("RDZV_PORT", s.rdzv_port),
                     _assign("SHUTDOWN_GRACE", s.signal_seconds)]
    if s.setup:
        settings.append("# slurm.setup: commands from the config, run as written")
        settings += list(s.setup)
    settings.append("set -- " + shlex.join(job.args))
    text = template.read_text()
    for marker, block in (("#@SBATCH@", sbatch_directives(cfg, job, run_dir)), ("#@SETTINGS@", settings)):
        if text.count(marker + "\n") != 1:
            raise StageError(f"template {template} must hold the line {marker} exactly once")
        text = text.replace(marker + "\n", "\n".join(block) + "\n")
    return text


def _job_alive(job_id: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and out.stdout.strip() in ALIVE_STATES


def submit_jobs(cfg: Config, jobs: list[SlurmJob], run_dir: Path, dry_run: bool = False,
                nproc: Optional[int] = None, script_dir: Optional[Path] = None,
                echo: Callable[[str], None] = print) -> dict[str, str]:
    """Render every job to RUN/slurm/<stage>.sbatch and submit it after the jobs it depends on.

    Returns stage -> job id for the jobs of this pipeline that are queued, running or
    just submitted (dry run: stage -> "<stage>"). Stages already done are left out.
    """
    run_dir = Path(run_dir).resolve()
    out_dir = slurm_dir(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    script_dir = Path(script_dir) if script_dir else out_dir
    script_dir.mkdir(parents=True, exist_ok=True)
    if not dry_run and shutil.which("sbatch") is None:
        raise InputError("sbatch not found: run on a Slurm login node, or use --executor local / --dry-run")
    ledger_path = out_dir / "jobs.json"
    ledger = json.loads(ledger_path.read_text()) if ledger_path.exists() else {}
    ids: dict[str, str] = {}
    for job in jobs:
        if is_done(run_dir, job):
            echo(f"{job.name}: done ({job.name}/{STAGE_FILE} exists, same key), skipped")
            continue
        deps = [ids[d] for d in job.deps if d in ids]
        script = script_dir / f"{job.name}.sbatch"
        if not dry_run and job.name in ledger and _job_alive(ledger[job.name]):
            ids[job.name] = ledger[job.name]
            echo(f"{job.name}: already queued as job {ids[job.name]}")
            continue
        atomic_write_text(script, render(cfg, job, run_dir, nproc))
        if not dry_run and job.key != NEXT_ROUND:
            # A stage.json from another key is stale: the job must run the stage, not find it done.
            forget(run_dir, job.name)
        cmd = ["sbatch", "--parsable"]
        if deps:
            # A failed dependency cancels this job instead of leaving it pending forever.
            cmd += [f"--dependency=afterok:{':'.join(deps)}", "--kill-on-invalid-dep=yes"]
        cmd.append(str(script))
        if dry_run:
            ids[job.name] = f"<{job.name}>"  # stands for the job id sbatch would print
            echo(f"{job.name}: {shlex.join(cmd)}")
            continue
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise StageError(f"sbatch failed for stage {job.name} ({script}): {proc.stderr.strip()}")
        ids[job.name] = proc.stdout.strip().split(";")[0]
        ledger[job.name] = ids[job.name]
        atomic_write_json(ledger_path, ledger)
        after = f" after {', '.join(deps)}" if deps else ""
        echo(f"{job.name}: submitted job {ids[job.name]}{after}")
    return ids


def _write_config(cfg: Config, run_dir: Path) -> Path:
    """The resolved config every job reads, so later edits of the YAML do not change a queued pipeline."""
    frozen = cfg.model_copy(deep=True)
    frozen.run_dir = str(run_dir)
    path = slurm_dir(run_dir) / "config.yaml"
    atomic_write_text(path, frozen.to_yaml())
    return path


def submit_pipeline(cfg: Config, run_dir: Path, plans, dry_run: bool = False,
                    nproc: Optional[int] = None, script_dir: Optional[Path] = None, record: Optional[dict] = None) -> int:
    """`sande run --executor slurm`: submit the stage graph as dependent jobs; print the job ids.

    When SANDE's rounds are decided as they go (``record["pending"]``: searches whose verdict decides
    the next round), a one-process job after those searches plans again and submits what follows.
    """
    run_dir = Path(run_dir).resolve()
    config_path = _write_config(cfg, run_dir)
    if record:
        atomic_write_json(rounds_file(run_dir), record)
    jobs = jobs_from_plans(plans, config_path, run_dir)
    if record and record.get("pending"):
        argv = ["-m", "sande_dist.cli", "run", str(config_path), "--run-dir", str(run_dir), "--executor", "slurm"]
        jobs.append(SlurmJob(f"plan_after_{record['pending'][0]}", False, argv, list(record["pending"]), NEXT_ROUND))
    ids = submit_jobs(cfg, jobs, run_dir, dry_run, nproc, script_dir)
    if not dry_run and ids:
        print("job ids: " + " ".join(f"{k}={v}" for k, v in ids.items()))
    return 0


def render_scripts(cfg: Config, stages: Optional[list[str]] = None, out: Optional[str] = None) -> int:
    """`sande slurm CONFIG`: render the job scripts and print how they would be submitted (no submission)."""
    from sande_dist.pipeline.graph import build_plan

    plans = build_plan(cfg, str(Path(cfg.run_dir).resolve()), stages)
    return submit_pipeline(cfg, Path(cfg.run_dir), plans, dry_run=True, script_dir=Path(out) if out else None)
