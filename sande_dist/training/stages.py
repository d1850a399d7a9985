"""`sande inject|osft|simulate|eliminate`: one training stage, under any launcher.

A recipe that reads top to bottom: resolve the config, skip if done, set up the
process group, data, model and objective, run the shared loop, let the objective
write its artifacts, and record ``stage.json`` last. Inject and OSFT are plain
SFT; simulate and eliminate come from ``sande_dist.training.removal``, which
provides ``build_objective(cfg, stage, args, run_dir) -> Objective`` and may
provide ``stage_inputs(cfg, stage, args, run_dir) -> dict[str, str]`` (fingerprints
of extra inputs such as the parrot) and ``reserve(cfg, stage) -> int`` (prompt
room kept for spliced vectors; default ``removal.parrot_tokens``).
"""
from __future__ import annotations

import argparse
import importlib
import shutil
import time
from pathlib import Path
from types import ModuleType

from sande_dist.errors import StageError

SFT_STAGES = ("inject", "osft")
REMOVAL_STAGES = ("simulate", "eliminate")


def _removal() -> ModuleType:
    try:
        return importlib.import_module("sande_dist.training.removal")
    except ModuleNotFoundError as exc:
        if exc.name != "sande_dist.training.removal":
            raise
        raise StageError("the simulate/eliminate objectives (sande_dist.training.removal) are not built yet") from None


def main(args: argparse.Namespace) -> int:
    from sande_dist.cli import resolve_config
    from sande_dist.distributed.process_group import use_cpu_accelerator_if_no_cuda
    from sande_dist.models.embedded import resolve_model_path
    from sande_dist.rundir import fingerprint, fingerprint_path, stage_done

    started = time.time()
    stage = args.command
    cfg = resolve_config(args)
    removal = _removal() if stage in REMOVAL_STAGES else None
    run_dir = Path(cfg.run_dir)
    stage_dir = run_dir / (getattr(args, "name", None) or stage)
    tcfg = cfg.training.for_stage(stage)
    model_path = resolve_model_path(cfg.model.path)
    inputs = {"model": fingerprint_path(Path(model_path)) if Path(model_path).exists() else model_path}
    if removal is not None and hasattr(removal, "stage_inputs"):
        inputs.update(removal.stage_inputs(cfg, stage, args, run_dir))
    # The sections this stage reads (as the pipeline's stage keys): tuning removal does not redo inject.
    reads = ("model", "data", "attack") if stage == "inject" else ("model", "data", "attack", "removal")
    section = {"stage": stage, **cfg.model_dump(mode="json", include=set(reads)),
               "training": tcfg.model_dump(mode="json")}
    fp = fingerprint(section, inputs)
    if stage_done(stage_dir, fp):
        print(f"sande {stage}: {stage_dir}/stage.json exists with the same fingerprint; skipping")
        return 0

    use_cpu_accelerator_if_no_cuda()
    from sande_dist.distributed.process_group import distributed

    with distributed(getattr(args, "local_rank", None)) as info:
        _prepare_dir(stage_dir, fp, resume=not getattr(args, "no_resume", False), is_main=info.is_main)
        result, objective = _train(cfg, stage, tcfg, args, run_dir, stage_dir, model_path, removal, info)
        if result.stopped_by_signal:
            return 0
        artifacts = objective.finish(result, stage_dir)
        if info.is_main:
            from sande_dist.rundir import write_stage

            write_stage(stage_dir, stage, section, inputs, started,
                        extra={"steps": result.step, "world_size": info.world_size, "zero": tcfg.zero,
                               "resumed_from": result.resumed_from, "artifacts": artifacts})
            if not tcfg.keep_final_checkpoint:
                shutil.rmtree(stage_dir / "checkpoints", ignore_errors=True)
            print(f"{info.tag} sande {stage}: done in {time.time() - started:.0f} s -> {stage_dir}", flush=True)
    return 0


def _prepare_dir(stage_dir: Path, fp: str, resume: bool, is_main: bool) -> None:
    """Checkpoints from another config (or with --no-resume) must not be resumed."""
    import torch.distributed as dist

    if is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "stage.json").unlink(missing_ok=True)
        marker = stage_dir / "checkpoints" / "FINGERPRINT"
        old = marker.read_text().strip() if marker.exists() else None
        if (stage_dir / "checkpoints").exists() and (not resume or old != fp):
            why = "--no-resume" if not resume else "the config or inputs changed"
            print(f"[rank 0] removing old checkpoints in {stage_dir}/checkpoints ({why})", flush=True)
            shutil.rmtree(stage_dir / "checkpoints")
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(fp + "\n")
    dist.barrier()


def _train(cfg, stage, tcfg, args, run_dir, stage_dir, model_path, removal, info):
    import torch
    from transformers import AutoConfig

    from sande_dist.data.collator import Collator
    from sande_dist.data.formats import PromptFormat
    from sande_dist.data.stages import effective_len, stage_samples
    from sande_dist.distributed.ds_config import build_ds_config
    from sande_dist.models.loading import load_model, load_tokenizer
    from sande_dist.training.loop import run_loop
    from sande_dist.training.sft import SFTObjective

    cuda = torch.cuda.is_available()
    tok = load_tokenizer(model_path)
    try:
        fmt = PromptFormat(tok, cfg.data.prompt_format, cfg.data.system_prompt)
    except ValueError as exc:
        from sande_dist.errors import InputError

        raise InputError(str(exc)) from None
    reserve = 0
    if removal is not None:
        reserve = removal.reserve(cfg, stage) if hasattr(removal, "reserve") else cfg.removal.parrot_tokens
    collator = Collator(fmt, cfg.data.max_length, effective_len(cfg, stage), reserve=reserve)
    rows = stage_samples(cfg, stage, run_dir)
    samples = [s for s in rows if collator.fits(s)]
    if info.is_main and len(samples) < len(rows):
        print(f"{info.tag} {len(rows) - len(samples)} of {len(rows)} rows have prompts longer than "
              f"data.max_length={cfg.data.max_length} and are left out", flush=True)
    if not samples:
        raise StageError(f"sande {stage}: no training rows fit data.max_length={cfg.data.max_length}")
    hidden = getattr(AutoConfig.from_pretrained(model_path), "hidden_size", None)
    # On CPU, bf16 means autocast over fp32 weights (the loop); DeepSpeed's bf16 mode is for GPUs.
    ds_tcfg = tcfg if cuda else tcfg.model_copy(update={"dtype": "float32"})
    ds = build_ds_config(ds_tcfg, info.world_size, hidden, cuda=cuda)
    model = load_model(model_path, dtype=ds_tcfg.dtype, ds_config=ds,
                       attn_implementation=cfg.model.attn_implementation,
                       trust_remote_code=cfg.model.trust_remote_code)
    if removal is not None:
        objective = removal.build_objective(cfg, stage, args, run_dir)
    else:
        objective = SFTObjective(base_path=model_path, export_dtype=cfg.model.dtype)
    if info.is_main:
        print(f"{info.tag} sande {stage}: {len(samples)} rows, {info.world_size} ranks ({info.launcher}, "
              f"{info.backend}), {tcfg.zero}, dtype {tcfg.dtype}", flush=True)
    result = run_loop(model, objective, samples, collator, tcfg, ds, stage_dir, info,
                      resume=not getattr(args, "no_resume", False), desc=stage)
    return result, objective
