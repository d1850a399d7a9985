"""`sande inject|osft|sft_clean|simulate|eliminate`: one training stage, under any launcher.

A recipe that reads top to bottom: check the model, build the kind's objective
(the registry names it), skip if done, set up the process group, data and model,
run the shared loop, let the objective write its artifacts, and record
``stage.json`` last. ``setup_training`` and ``train`` are the same steps for
tests and benchmarks that need the model or the engine in between.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sande_dist.config import Config, TrainingConfig
from sande_dist.errors import InputError
from sande_dist.registry import KINDS, StageOptions, load
from sande_dist.rundir import (atomic_write_json, atomic_write_text, checkpoints_dir, file_identity, fingerprint,
                               input_error_file, model_identity, stage_code, stage_dir, stage_done, stopped_file,
                               targets_file, write_stage)
from sande_dist.timing import Phases


def stage_training(cfg: Config, kind: str) -> TrainingConfig:
    """The training settings of a ``kind`` stage: its registry hook, else ``training.<kind>`` over the shared ones."""
    hook = KINDS[kind].training
    return load(hook)(cfg) if hook else cfg.training.for_stage(kind)


def stage_samples(cfg: Config, kind: str, run_dir: Optional[Path] = None) -> list:
    """The training rows of a ``kind`` stage, from the builder the registry names."""
    spec = KINDS[kind]
    if spec.samples is None:
        raise ValueError(f"stage kind {kind!r} does not train")
    return load(spec.samples)(cfg, Path(run_dir or cfg.run_dir))


def build_objective(cfg: Config, kind: str, opts: StageOptions, model_path: str):
    return load(KINDS[kind].objective)(cfg, opts, model_path)


def stage_identity(cfg: Config, kind: str, tcfg: TrainingConfig, model_path: str, objective) -> tuple[dict, dict, str]:
    """(config section, inputs' identities, code hash): what decides whether a rerun may skip the stage."""
    from sande_dist.config import ds_config_file
    from sande_dist.data.sources import source_identity

    section = {"stage": kind, **cfg.model_dump(mode="json", include=set(KINDS[kind].reads)),
               "training": tcfg.model_dump(mode="json")}
    inputs = {"model": model_identity(model_path), "data": source_identity(cfg.data.train),
              "ds_config": file_identity(ds_config_file(tcfg.zero)), **objective.inputs()}
    if KINDS[kind].clean_targets and cfg.removal.targets == "self" and targets_file(cfg.run_dir).exists():
        inputs["targets"] = file_identity(targets_file(cfg.run_dir))
    return section, inputs, stage_code(kind)


def run_stage(cfg: Config, kind: str, opts: StageOptions) -> int:
    """Run one training stage of ``kind`` as this process's rank; every rank calls it.

    Bad input is also left in RUN/<stage>/input_error.txt (rank 0): a launcher such as torchrun
    reports its ranks' exit 2 as a plain failure, and the executor turns the file back into exit 2.
    """
    import os

    try:
        return _run_stage(cfg, kind, opts)
    except InputError as exc:
        if os.environ.get("RANK", "0") == "0":
            atomic_write_text(input_error_file(cfg.run_dir, opts.name or kind), f"{exc}\n")
        raise


def _run_stage(cfg: Config, kind: str, opts: StageOptions) -> int:
    from sande_dist.distributed.checkpoint import check_resume
    from sande_dist.distributed.ds_config import load_preset, zero_stage
    from sande_dist.distributed.process_group import (barrier, distributed, launch_world_size,
                                                      use_cpu_accelerator_if_no_cuda)
    from sande_dist.models.loading import adapter_record, check_model

    started = time.time()
    phases = Phases()
    phases.mark("imports")
    name = opts.name or kind
    out = stage_dir(cfg.run_dir, name)
    model_path = check_model(cfg.model.path, cfg.model.base)
    objective = build_objective(cfg, kind, opts, model_path)
    rows = stage_samples(cfg, kind)  # bad data fails here, before any process group
    tcfg = stage_training(cfg, kind)
    section, inputs, code = stage_identity(cfg, kind, tcfg, model_path, objective)
    fp = fingerprint(section, inputs, code)
    if stage_done(out, fp):
        print(f"sande {kind}: {out}/stage.json exists with the same fingerprint; skipping")
        return 0

    if opts.resume:
        check_resume(checkpoints_dir(cfg.run_dir, name), launch_world_size(), zero_stage(load_preset(tcfg.zero)[0]), fp)
    use_cpu_accelerator_if_no_cuda()
    phases.mark("inputs")
    with distributed(opts.local_rank, tcfg.dist_timeout_minutes) as info:
        if info.is_main:
            stopped_file(cfg.run_dir, name).unlink(missing_ok=True)  # an earlier stop's: this run goes on from it
        _prepare_dir(out, fp, resume=opts.resume, is_main=info.is_main)
        setup = setup_training(cfg, kind, tcfg, model_path, objective, info, rows)
        phases.mark("setup")
        result = train(setup, out, info, resume=opts.resume)
        if result.stopped_by_signal:
            # Exit 0 as after any asked-for stop (Slurm's requeue, torchrun); the file tells an executor it
            # was a stop, not a failure, and where a rerun resumes (the runner: exit 75).
            if info.is_main:
                atomic_write_json(stopped_file(cfg.run_dir, name),
                                  {"step": result.step, "budget_steps": result.total_steps,
                                   "checkpoints": str(checkpoints_dir(cfg.run_dir, name))})
            barrier()  # every rank's batch must find the file (the stop was agreed across ranks: all are here)
            return 0
        phases.mark_split("loop_other", result.timings)
        artifacts = objective.finish(result, out)
        phases.mark("export")
        if info.is_main:
            write_stage(out, kind, section, inputs, started, code,
                        extra={"steps": result.step, "budget_steps": result.total_steps,
                               "stopped_early_at": result.stopped_early_at, "world_size": info.world_size,
                               "zero": tcfg.zero,
                               "resumed_from": result.resumed_from, "artifacts": artifacts,
                               "deepspeed": engine_facts(result.engine, setup.ds_config, info.world_size),
                               "adapter": adapter_record(model_path),
                               "timings": phases.rounded(),
                               "bytes_written": {"checkpoints": result.checkpoint_bytes,
                                                 "artifacts": _bytes(out, exclude="checkpoints")}})
            if not tcfg.keep_final_checkpoint:
                shutil.rmtree(checkpoints_dir(cfg.run_dir, name), ignore_errors=True)
            print(f"{info.tag} sande {kind}: done in {time.time() - started:.0f} s -> {out}", flush=True)
        barrier()  # every rank leaves once stage.json exists (the process group may serve the next stage)
    return 0


def engine_facts(engine, ds_config: dict, world_size: int) -> dict:
    """What the engine really ran with: ZeRO stage, offload, precision (autocast: what the forward ran
    in, training/loop.cpu_autocast), optimizer class."""
    zero = ds_config.get("zero_optimization", {})
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return {"world_size": world_size, "zero_stage": zero.get("stage", 0),
            "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None),
            "offload_param": zero.get("offload_param", {}).get("device", "none") not in ("none", None),
            "bf16": bool(ds_config.get("bf16", {}).get("enabled")),
            "autocast": str(engine.module.autocast).removeprefix("torch.") if engine.module.autocast else None,
            "optimizer": type(inner).__name__,
            "gradient_checkpointing": bool(getattr(engine.module.model, "is_gradient_checkpointing", False))}


def _bytes(folder: Path, exclude: str) -> int:
    """Bytes of the files under ``folder``, leaving out its ``exclude`` subfolder."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and exclude not in p.relative_to(folder).parts)


def _prepare_dir(out: Path, fp: str, resume: bool, is_main: bool) -> None:
    """Checkpoints from another config (or with --no-resume) must not be resumed."""
    import torch.distributed as dist

    from sande_dist.distributed.checkpoint import FINGERPRINT_FILE
    from sande_dist.rundir import STAGE_FILE

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / STAGE_FILE).unlink(missing_ok=True)
        marker = out / "checkpoints" / FINGERPRINT_FILE
        old = marker.read_text().strip() if marker.exists() else None
        if (out / "checkpoints").exists() and (not resume or old != fp):
            why = "--no-resume" if not resume else "the config or inputs changed"
            print(f"[rank 0] removing old checkpoints in {out}/checkpoints ({why})", flush=True)
            shutil.rmtree(out / "checkpoints")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(fp + "\n")
    dist.barrier()


@dataclass
class Training:
    """Everything a training stage runs on, built and ready for the loop."""

    kind: str
    tcfg: TrainingConfig
    samples: list
    collator: Any
    ds_config: dict
    model: Any
    objective: Any


def setup_training(cfg: Config, kind: str, tcfg: TrainingConfig, model_path: str, objective, info,
                   rows: Optional[list] = None) -> Training:
    """Rows (``stage_samples`` unless given), collator, DeepSpeed config and the model (partitioned on
    load under ZeRO-3)."""
    import torch
    from transformers import AutoConfig

    from sande_dist.data.formats import PromptFormat
    from sande_dist.data.stages import row_length, stage_collator
    from sande_dist.distributed.ds_config import build_ds_config
    from sande_dist.models.loading import load_model, load_tokenizer

    cuda = torch.cuda.is_available()
    fmt = PromptFormat.from_config(load_tokenizer(model_path), cfg.data)
    collator = stage_collator(cfg, kind, fmt, tcfg)
    length, key = row_length(cfg, kind)
    rows = stage_samples(cfg, kind) if rows is None else rows
    samples = [s for s in rows if collator.fits(s)]
    if info.is_main and len(samples) < len(rows):
        print(f"{info.tag} {len(rows) - len(samples)} of {len(rows)} rows have prompts longer than "
              f"{key}={length} and are left out", flush=True)
    if not samples:
        raise InputError(f"sande {kind}: none of the {len(rows)} training rows fits {key}={length} (with "
                         f"{collator.reserve} parrot vectors); raise {key}")
    hidden = getattr(AutoConfig.from_pretrained(model_path), "hidden_size", None)
    # On CPU, bf16 means autocast over fp32 weights (the loop); DeepSpeed's bf16 mode is for GPUs.
    ds_tcfg = tcfg if cuda else tcfg.model_copy(update={"dtype": "float32"})
    ds = build_ds_config(ds_tcfg, info.world_size, hidden, cuda=cuda)
    model = load_model(model_path, dtype=ds_tcfg.dtype, ds_config=ds, attn_implementation=cfg.model.attn_implementation,
                       trust_remote_code=cfg.model.trust_remote_code)
    if info.is_main:
        print(f"{info.tag} sande {kind}: {len(samples)} rows, {info.world_size} ranks ({info.launcher}, "
              f"{info.backend}), {tcfg.zero}, dtype {tcfg.dtype}", flush=True)
    return Training(kind, tcfg, samples, collator, ds, model, objective)


def train(setup: Training, out: Path, info, resume: bool = True):
    """The shared loop on a set-up stage; checkpoints and metrics go under ``out``."""
    from sande_dist.training.loop import run_loop

    return run_loop(setup.model, setup.objective, setup.samples, setup.collator, setup.tcfg, setup.ds_config,
                    Path(out), info, resume=resume, desc=setup.kind)
