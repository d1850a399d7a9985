"""Training throughput and per-rank state: our loop vs Hugging Face Trainer, same DeepSpeed config.

    python benchmarks/train_throughput.py [--steps 8] [--nproc 2] [--model smollm2-135m-instruct]

Launches torchrun jobs side by side in one run, each on the same model, rows
(the inject data), micro batch, sequence length, ZeRO-3 preset and dtype:
  ours     our loop (logits only at label positions), tokens/s over steps after warm-up;
  trainer  transformers.Trainer with the same DeepSpeed JSON (full-vocab logits, as HF computes them);
  memory   measured per-rank parameter + optimizer bytes for ZeRO-0 and ZeRO-3 at 1 and N ranks.
Prints one JSON object. Non-pad tokens count; the first 2 steps are warm-up.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WARMUP = 2


def _setup(args, zero: str):
    from sande_dist.config import load_config
    from sande_dist.data.collator import Collator
    from sande_dist.data.formats import PromptFormat
    from sande_dist.training.stages import stage_samples
    from sande_dist.models.loading import load_tokenizer

    cfg = load_config(None, [f"model.path={args.model}", f"data.num_rows={args.rows}",
                             f"data.max_length={args.max_length}", f"training.zero={zero}",
                             f"training.micro_batch_size={args.micro}", f"training.max_steps={args.steps}",
                             "training.warmup_ratio=0", "training.scheduler=constant",
                             f"training.dtype={args.dtype}", "training.save_steps=100000"])
    collator = Collator(PromptFormat(load_tokenizer(args.model)), args.max_length)
    samples = [s for s in stage_samples(cfg, "inject") if collator.fits(s)]
    return cfg, cfg.training, collator, samples


def _tokens_per_s(step_times: list[float], step_tokens: list[int]) -> float:
    return sum(step_tokens[WARMUP:]) / sum(step_times[WARMUP:])


def worker_ours(args) -> dict:
    import torch.distributed as dist

    from sande_dist.distributed.ds_config import build_ds_config
    from sande_dist.distributed.memory import state_bytes
    from sande_dist.distributed.process_group import distributed
    from sande_dist.models.embedded import resolve_model_path
    from sande_dist.models.loading import load_model
    from sande_dist.training.loop import run_loop
    from sande_dist.training.sft import SFTObjective

    out = {}
    with distributed() as info:
        for zero in args.zeros.split(","):
            cfg, tcfg, collator, samples = _setup(args, zero)
            ds = build_ds_config(tcfg.model_copy(update={"dtype": "float32"}), info.world_size, 576)
            model = load_model(resolve_model_path(args.model), "float32", ds)
            run_dir = Path(args.out) / f"ours_{zero}_{info.world_size}"
            result = run_loop(model, SFTObjective(), samples, collator, tcfg, ds, run_dir, info, resume=False,
                              desc=f"ours {zero}")
            mem = [None] * info.world_size
            dist.all_gather_object(mem, state_bytes(result.engine))
            if info.is_main:
                recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                out[zero] = {"tokens_per_s": _tokens_per_s([r["step_time_s"] for r in recs],
                                                           [r["tokens"] for r in recs]),
                             "state_bytes_per_rank": mem}
            del result, model
    return out


def worker_trainer(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from sande_dist.distributed.ds_config import build_ds_config
    from sande_dist.distributed.process_group import use_cpu_accelerator_if_no_cuda
    from sande_dist.models.embedded import resolve_model_path

    use_cpu_accelerator_if_no_cuda()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg, tcfg, collator, samples = _setup(args, "zero3")
    ds = build_ds_config(tcfg.model_copy(update={"dtype": "float32"}), world, 576)
    # Under torchrun on CPU the Trainer believes it is alone while DeepSpeed sees every rank,
    # so the global batch size is left for DeepSpeed to derive.
    ds.pop("train_batch_size")
    tokens: list[int] = []

    def collate(rows):
        batch = collator(rows)
        batch.pop("slot_index")
        tokens.append(int(batch["attention_mask"].sum()))
        return batch

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    timer = Timer()
    targs = TrainingArguments(output_dir=str(Path(args.out) / "trainer"), per_device_train_batch_size=args.micro,
                              gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=tcfg.lr,
                              weight_decay=0.0, max_grad_norm=tcfg.max_grad_norm, lr_scheduler_type="constant",
                              warmup_steps=0, logging_steps=10 ** 6, save_strategy="no", report_to=[],
                              dataloader_num_workers=0, remove_unused_columns=False, deepspeed=ds,
                              bf16=args.dtype == "bfloat16", seed=tcfg.seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.model), dtype=torch.float32,
                                                 attn_implementation="sdpa")
    trainer = Trainer(model=model, args=targs, train_dataset=samples, data_collator=collate, callbacks=[timer])
    trainer.train()
    # Every rank's tokens count; ranks see equal numbers of micro-batches.
    import torch.distributed as dist

    t = torch.tensor(tokens[: len(timer.times)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    res = {"tokens_per_s": _tokens_per_s(timer.times, t.tolist())}
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return res if int(os.environ.get("RANK", "0")) == 0 else {}


def launch(args, role: str, nproc: int, extra: list[str]) -> dict:
    from sande_dist.distributed.process_group import free_port

    out_json = Path(args.out) / f"{role}_{nproc}.json"
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", str(nproc),
           "--master_port", str(free_port()), __file__, "--worker", role, "--result", str(out_json),
           "--out", args.out, "--model", args.model, "--steps", str(args.steps), "--rows", str(args.rows),
           "--micro", str(args.micro), "--max-length", str(args.max_length), "--dtype", args.dtype, *extra]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    res = json.loads(out_json.read_text())
    res["wall_s"] = round(time.time() - t0, 1)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default=None)
    p.add_argument("--worker", choices=["ours", "trainer"], help=argparse.SUPPRESS)
    p.add_argument("--zeros", default="zero3", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        res = worker_ours(args) if args.worker == "ours" else worker_trainer(args)
        if int(os.environ.get("RANK", "0")) == 0:
            Path(args.result).write_text(json.dumps(res))
        return 0
    args.out = args.out or tempfile.mkdtemp(prefix="sande-bench-")
    ours = launch(args, "ours", args.nproc, ["--zeros", "zero3,zero0"])
    trainer = launch(args, "trainer", args.nproc, [])
    single = launch(args, "ours", 1, ["--zeros", "zero3,zero0"])
    report = {"model": args.model, "ranks": args.nproc, "steps": args.steps, "micro_batch": args.micro,
              "max_length": args.max_length, "dtype": args.dtype, "zero": "zero3",
              "ours": ours, "trainer": trainer, "single_rank": single}
    try:
        o, t = ours["zero3"]["tokens_per_s"], trainer["tokens_per_s"]
        report["speedup_vs_trainer"] = round(o / t, 3)
        z0 = max(m["total"] for m in ours["zero0"]["state_bytes_per_rank"])
        z3 = max(m["total"] for m in ours["zero3"]["state_bytes_per_rank"])
        report["zero3_over_zero0_state_per_rank"] = round(z3 / z0, 3)
    except (KeyError, TypeError):
        pass
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
