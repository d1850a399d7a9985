"""`sande run`: execute the stage graph, each stage its own process group.

Training stages run under torchrun (gloo on CPU, nccl on GPU); generation and
evaluation run as a plain process, so vLLM and DeepSpeed never share one.
A stage is skipped when its stage.json exists and its pipeline key is unchanged;
a stage killed midway resumes from its own checkpoint when run again.
SIGTERM, SIGHUP or SIGINT (Ctrl-C) to `sande run` is passed on to the launch as
SIGTERM: its training ranks save a checkpoint at their next step and the run exits
75 (stopped, rerun to resume).
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from sande_dist.config import Config
from sande_dist.distributed.process_group import free_port, usable_cores
from sande_dist.errors import InputError, StageError, StageStopped, read_json
from sande_dist.pipeline.graph import StagePlan, build_graph
from sande_dist.pipeline.progress import LiveLine, describe, stage_progress
from sande_dist.rundir import (atomic_write_json, atomic_write_text, executor_file, forget, input_error_file, is_done,
                               live_executor, log_file, log_tail, process_start, read_stage, rounds_file, stage_dir,
                               stopped_file, write_key)


@dataclass
class RunOptions:
    """`sande run`'s flags."""

    stages: Optional[list[str]] = None  # --stages: a subset of the pipeline's stage names
    executor: str = "local"  # local | slurm
    nproc: Optional[int] = None  # training ranks per node (default pipeline.nproc)
    dry_run: bool = False  # slurm: render the job scripts, submit nothing


def batch_command(distributed: bool, spec: Path, nproc: int) -> list[str]:
    """The launch of a batch of stages: torchrun with ``nproc`` ranks for training, else one process."""
    argv = ["-m", "sande_dist.cli", "batch", str(spec)]
    if not distributed:
        return [sys.executable, *argv]
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *argv]


def stage_env(nproc: int) -> dict[str, str]:
    env = dict(os.environ)
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
        # Ranks share the cores this job may use (its affinity: Slurm's --cpus-per-task, taskset), not
        # the node's: without this each rank spawns one thread per core of the whole machine.
        env.setdefault("OMP_NUM_THREADS", str(max(1, len(usable_cores()) // nproc)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # After a forwarded SIGTERM, torchrun waits this long for its ranks' checkpoint before SIGKILL (30 s by
    # default: short for a large model's save). Slurm jobs set it from slurm.signal_seconds.
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    return env


@contextlib.contextmanager
def forward_stop_signals(proc: subprocess.Popen):
    """While ``proc`` runs, SIGTERM/SIGHUP/SIGINT to this process become SIGTERM to it (torchrun passes that on to
    the ranks, whose loop saves a checkpoint and exits), instead of killing this process and leaving the
    launch behind. Yields a list that holds the signals received."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def forward(signum, _frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    # SIGINT: Ctrl-C, which the ranks get from the terminal as well; they save a checkpoint on either.
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def check_inputs(cfg: Config) -> None:
    """What a pipeline reads from the user, checked before any stage starts: bad input is an exit-2
    error in seconds, not a failed stage minutes in."""
    from sande_dist.data.stages import base_samples
    from sande_dist.data.stages import eval_samples
    from sande_dist.evaluation.utility import check_tasks
    from sande_dist.models.loading import check_model

    check_model(cfg.model.path, cfg.model.base)
    base_samples(cfg)
    eval_samples(cfg)
    check_tasks(cfg.eval.utility_tasks)


def batches(plans: list[StagePlan]) -> list[list[StagePlan]]:
    """Consecutive stages of the same kind of launch (torchrun, or one process), in plan order."""
    out: list[list[StagePlan]] = []
    for plan in plans:
        if out and out[-1][0].distributed == plan.distributed:
            out[-1].append(plan)
        else:
            out.append([plan])
    return out


class _Batch:
    """One launch running several stages in turn (``sande batch``): the imports, the launcher and the
    process group are paid once. Each stage keeps its own key, log, stage.json and checkpoints."""

    def __init__(self, plans: list[StagePlan], run_dir: Path, config_path: Path, nproc: int, tags: dict[str, str],
                 echo):
        self.plans, self.run_dir, self.tags, self.echo = plans, run_dir, tags, echo
        self.ranks = nproc if plans[0].distributed else 1
        spec = stage_dir(run_dir, plans[0].name) / "batch.json"
        for plan in plans:
            stage_dir(run_dir, plan.name).mkdir(parents=True, exist_ok=True)
            forget(run_dir, plan.name)  # a changed key: this stage is stale
            input_error_file(run_dir, plan.name).unlink(missing_ok=True)
            stopped_file(run_dir, plan.name).unlink(missing_ok=True)
        atomic_write_json(spec, {"distributed": plans[0].distributed,
                                 "stages": [p.argv(str(config_path), str(run_dir)) for p in plans]})
        self.cmd = batch_command(plans[0].distributed, spec, self.ranks)
        # The keys go first: stage.json (written last by each stage) then marks its key done, even when
        # this runner is killed between a stage's end and its own next line.
        for plan in plans:
            write_key(run_dir, plan.name, plan.key, command=self.cmd)

    def run(self) -> None:
        launcher_log = log_file(self.run_dir, self.plans[0].name)
        with open(launcher_log, "a") as fh:
            fh.write(f"\n$ {' '.join(self.cmd)}\n")
            fh.flush()
            proc = subprocess.Popen(self.cmd, stdout=fh, stderr=subprocess.STDOUT, env=stage_env(self.ranks))
            with forward_stop_signals(proc) as received:
                rc = self._watch(proc)
        self._check(rc, signalled=bool(received))

    def _watch(self, proc: subprocess.Popen) -> int:
        """Follow the stages as they finish; a live line for the one running."""
        live = LiveLine(self.echo)
        pending = list(self.plans)
        started = time.time()
        self._announce(pending[0], live)
        while True:
            rc = proc.poll()
            while pending and read_stage(stage_dir(self.run_dir, pending[0].name)) is not None:
                self._finished(pending.pop(0), time.time() - started, live)
                started = time.time()
                if pending:
                    self._announce(pending[0], live)
            if rc is not None:
                live.clear()
                return rc
            if pending:
                live.update(f"{self.tags[pending[0].name]} "
                            f"{describe(started, stage_progress(self.run_dir, pending[0].name))}")
            time.sleep(0.5)

    def _announce(self, plan: StagePlan, live: LiveLine) -> None:
        live.clear()
        how = f"torchrun x{self.ranks}" if plan.distributed else "one process"
        self.echo(f"{self.tags[plan.name]} running ({how}), log {log_file(self.run_dir, plan.name)}")

    def _finished(self, plan: StagePlan, wall: float, live: LiveLine) -> None:
        # The launcher's share of the stage's time is only visible here (benchmarks/pipeline_profile.py).
        write_key(self.run_dir, plan.name, plan.key, command=self.cmd, wall_s=round(wall, 2), ranks=self.ranks)
        live.clear()
        self.echo(f"{self.tags[plan.name]} done in {wall:.0f}s")

    def _check(self, rc: int, signalled: bool = False) -> None:
        failed = next((p for p in self.plans if read_stage(stage_dir(self.run_dir, p.name)) is None), None)
        rerun = "run the same command again"
        if failed is None:
            if signalled:  # the signal came as the batch ended: the stages after it must not start
                raise StageStopped(f"on a signal, after stage {self.plans[-1].name} finished; {rerun} for the "
                                   f"stages left")
            return
        log = log_file(self.run_dir, failed.name)
        stopped = stopped_file(self.run_dir, failed.name)
        if stopped.exists():  # its ranks saved a checkpoint on SIGTERM/SIGUSR1 (forwarded from here or not)
            at = read_json(stopped)
            raise StageStopped(f"stage {failed.name} at step {at['step']} of {at['budget_steps']}, on a signal; its "
                               f"checkpoint is in {at['checkpoints']}: {rerun} to resume from it (log: {log})")
        if signalled:
            raise StageStopped(f"stage {failed.name}, on a signal, before it saved a checkpoint (it will start over): "
                               f"{rerun} to go on (log: {log})")
        tail = "\n".join(log_tail(log, 15))
        refused = input_error_file(self.run_dir, failed.name)
        if rc == 2 or refused.exists():  # the stage refused its input: the user's to fix, as for any command
            why = refused.read_text().strip() if refused.exists() else tail
            raise InputError(f"stage {failed.name}: {why} (log: {log})")
        raise StageError(f"stage {failed.name} failed (exit {rc}); see {log}\n{tail}")


def run_local(cfg: Config, run_dir: Path, plans: list[StagePlan] | Callable[[], tuple[list[StagePlan], dict]],
              nproc: int, echo=print, only: Optional[list[str]] = None) -> None:
    """Run every stage not done yet, batch by batch. ``plans`` may be a function that plans again after
    each batch (SANDE's rounds decided as they go, graph.build_graph): the run ends when nothing is left."""
    plan_now = plans if callable(plans) else (lambda: (plans, {}))
    other = live_executor(run_dir)
    if other is not None:
        raise InputError(f"{run_dir}: another `sande run` (pid {other['pid']}, started {other.get('started')}) is "
                         f"running in this directory, and two would write the same stages and checkpoints; wait for "
                         f"it, or stop it (kill {other['pid']}: its training stage saves a checkpoint) and run again")
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    atomic_write_text(config_path, cfg.to_yaml())
    atomic_write_json(executor_file(run_dir), {"executor": "local", "pid": os.getpid(), "host": socket.gethostname(),
                                               "pid_start": process_start(os.getpid()),
                                               "run_dir": str(run_dir), "only": only,
                                               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    seen: dict[str, int] = {}
    reported: set[str] = set()  # stages already said done (or run) in this invocation
    while True:
        current, record = plan_now()
        if record:
            atomic_write_json(rounds_file(run_dir), record)
        for plan in current:
            seen.setdefault(plan.name, len(seen) + 1)
        width = len(str(len(seen)))
        tags = {p.name: f"[{seen[p.name]:>{width}}/{len(seen)}] {p.name:<20}" for p in current}
        todo = []
        for plan in current:
            if not is_done(run_dir, plan.name, plan.key):
                todo.append(plan)
            elif plan.name not in reported:
                echo(f"{tags[plan.name]} done earlier, skipped")
            reported.add(plan.name)
        if not todo:
            return
        for batch in batches(todo):
            _Batch(batch, run_dir, config_path, nproc, tags, echo).run()


def finish_report(run_dir: Path, echo=print) -> None:
    from sande_dist.evaluation.report import write_run_report

    md = write_run_report(run_dir)
    if md is not None:
        echo("")
        echo(md.read_text())


def run_pipeline(cfg: Config, opts: RunOptions) -> int:
    """`sande run CONFIG`: every stage of the graph, locally or as Slurm jobs."""
    run_dir = Path(cfg.run_dir)
    if opts.executor == "slurm":
        from sande_dist.pipeline.slurm import submit_pipeline

        plans, record = build_graph(cfg, str(run_dir.resolve()), opts.stages)
        if not opts.dry_run:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(executor_file(run_dir), {"executor": "slurm", "run_dir": str(run_dir.resolve()),
                                                       "only": opts.stages})
        return submit_pipeline(cfg, run_dir, plans, dry_run=opts.dry_run, nproc=opts.nproc, record=record)
    check_inputs(cfg)
    run_local(cfg, run_dir, lambda: build_graph(cfg, str(run_dir), opts.stages), opts.nproc or cfg.pipeline.nproc,
              only=opts.stages)
    finish_report(run_dir)
    return 0
