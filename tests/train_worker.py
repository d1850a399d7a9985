"""Runs under torchrun (2 gloo ranks) for tests/test_training_core.py; rank 0 writes a JSON result.

One launch covers: the same 10-step SFT run under ZeRO-0, ZeRO-2 and ZeRO-3 (loss curves,
per-rank state bytes, ZeRO-3 shard sizes), then the engine's eval loss and an HF export of
the ZeRO-3 model, and a short ZeRO-3 run + export of an untied model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from sande_dist.distributed.process_group import distributed

EVAL_ROWS, EVAL_MICRO = 8, 2


def data(model_path: str):
    from sande_dist.config import load_config
    from sande_dist.data.collator import Collator
    from sande_dist.data.formats import PromptFormat
    from sande_dist.training.stages import stage_samples
    from sande_dist.models.loading import load_tokenizer

    cfg = load_config(None, ["data.num_rows=24", "data.max_length=64", f"model.path={model_path}"])
    collator = Collator(PromptFormat(load_tokenizer(model_path)), 64)
    samples = [s for s in stage_samples(cfg, "inject") if collator.fits(s)]
    return samples, collator


def eval_batches(samples, collator, rank: int, world: int):
    chunks = [samples[i:i + EVAL_MICRO] for i in range(0, EVAL_ROWS, EVAL_MICRO)]
    return [collator(c) for c in chunks[rank::world]]


def train(model_path: str, zero: str, steps: int, out: Path, info):
    from sande_dist.config import TrainingConfig
    from sande_dist.distributed.ds_config import build_ds_config
    from sande_dist.models.loading import load_model
    from sande_dist.training.loop import run_loop
    from sande_dist.training.sft import SFTObjective

    samples, collator = data(model_path)
    tcfg = TrainingConfig(zero=zero, max_steps=steps, micro_batch_size=2, lr=1e-3, warmup_ratio=0.1,
                          save_steps=1000, seed=0, dtype="float32")
    ds = build_ds_config(tcfg, info.world_size, hidden_size=64)
    model = load_model(model_path, "float32", ds)
    result = run_loop(model, SFTObjective(), samples, collator, tcfg, ds, out, info, resume=False, desc=zero)
    return result, samples, collator


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--untied", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    import torch.distributed as dist

    from sande_dist.distributed.memory import state_bytes
    from sande_dist.models.export import export_hf
    from sande_dist.training.loop import eval_loss

    report: dict = {"losses": {}, "bytes": {}}
    with distributed() as info:
        for zero in ("zero0", "zero2", "zero3"):
            result, samples, collator = train(args.model, zero, 10, out / zero, info)
            mem = [None] * info.world_size
            dist.all_gather_object(mem, state_bytes(result.engine))
            report["bytes"][zero] = mem
            if info.is_main:
                lines = (out / zero / "metrics.jsonl").read_text().splitlines()
                report["losses"][zero] = [json.loads(line)["loss"] for line in lines]
        # ZeRO-3: the shard each rank holds of every large parameter.
        fractions = {}
        for name, prm in result.engine.module.named_parameters():
            if prm.ds_numel >= 4096:
                fractions[name] = prm.ds_tensor.numel() / prm.ds_numel
        shards = [None] * info.world_size
        dist.all_gather_object(shards, fractions)
        report["shards"] = shards
        report["eval_loss"] = eval_loss(result.engine, eval_batches(samples, collator, info.rank, info.world_size))
        export_hf(result.module.model, out / "export_tied", args.model)

        result, samples, collator = train(args.untied, "zero3", 2, out / "untied", info)
        report["eval_loss_untied"] = eval_loss(result.engine, eval_batches(samples, collator, info.rank,
                                                                           info.world_size))
        export_hf(result.module.model, out / "export_untied", args.untied)
        if info.is_main:
            (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
