"""Stand-ins for a training stage and an evaluation stage, for the real-Slurm test.

`train` behaves as the stage contract asks of a training stage under torchrun:
it joins a gloo process group from the launcher's environment, all-reduces,
takes "steps", and on SIGUSR1/SIGTERM writes a checkpoint and exits 0; started
again it resumes from that checkpoint. It writes RUN/<stage>/stage.json last.
`eval` is one process that needs the training stage's stage.json.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def train(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    nodes: list = [None] * world
    dist.all_gather_object(nodes, os.environ.get("SLURMD_NODENAME", socket.gethostname()))

    stage = Path(args.run_dir) / args.stage
    stage.mkdir(parents=True, exist_ok=True)
    ckpt = stage / "checkpoint.json"
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    if rank == 0:
        with open(stage / "attempts.jsonl", "a") as f:
            f.write(json.dumps({"restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
                                "resumed_from": start, "world_size": world, "allreduce": total.item(),
                                "nodes": nodes}) + "\n")
    print(f"[rank {rank}] world {world} all-reduce {total.item()} nodes {nodes} resume at step {start}", flush=True)

    step = start
    while True:
        time.sleep(args.step_seconds)
        step += 1
        if rank == 0:
            (stage / "progress").write_text(str(step))
        # All ranks stop at the same step, even if the signal reached them at different times.
        flag = torch.tensor([1.0 if stop["signal"] else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            if rank == 0:
                _write_json(ckpt, {"step": step})
            print(f"[rank {rank}] {stop['signal']}: checkpoint at step {step}, exiting 0", flush=True)
            break
        done = step - start >= args.steps and (start > 0 or not args.until_preempted)
        if done or step > args.max_steps:
            if rank == 0:
                _write_json(stage / "stage.json", {"stage": args.stage, "steps": step, "resumed_from": start})
            break
    dist.barrier()
    dist.destroy_process_group()
    return 0 if step <= args.max_steps else 1


def evaluate(args: argparse.Namespace) -> int:
    trained = Path(args.run_dir) / args.after / "stage.json"
    if not trained.exists():
        print(f"{trained} missing: evaluation ran before training finished", file=sys.stderr)
        return 1
    stage = Path(args.run_dir) / args.stage
    stage.mkdir(parents=True, exist_ok=True)
    _write_json(stage / "stage.json", {"stage": args.stage, "trained": json.loads(trained.read_text()),
                                       "node": os.environ.get("SLURMD_NODENAME")})
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "eval"])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--stage", required=True)
    p.add_argument("--after", default="train")
    p.add_argument("--steps", type=int, default=3, help="steps to take (after a resume, if --until-preempted)")
    p.add_argument("--step-seconds", type=float, default=0.5)
    p.add_argument("--until-preempted", action="store_true", help="a first attempt runs until signalled")
    p.add_argument("--max-steps", type=int, default=400)
    args = p.parse_args()
    return train(args) if args.mode == "train" else evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
