"""The one training loop: DeepSpeed engine, deterministic data order, schedule, checkpoints, resume.

Every stage runs through ``run_loop`` with its own Objective. Resume is exact:
the data order is a pure function of (seed, micro-batch index), the learning
rate of the step, and each rank's RNG states are saved with the checkpoint.
SIGTERM, SIGUSR1 (Slurm's warning before a time limit) and SIGINT (Ctrl-C, which
the terminal sends to every process of the run) make the loop save a checkpoint
at the next step boundary and return with ``stopped_by_signal``.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from sande_dist.config import TrainingConfig
from sande_dist.distributed.checkpoint import CheckpointManager
from sande_dist.distributed.process_group import DistInfo
from sande_dist.timing import Phases
from sande_dist.tracking import Tracker
from sande_dist.training.objective import LoopResult, Objective, TrainModule


class DataOrder:
    """A seeded, rank-sharded stream of micro-batches over ``n`` rows, any number of epochs.

    Epoch ``e`` is a permutation seeded with ``seed + e``, padded by wrapping to a
    multiple of ``world * micro``; global micro-batch ``j`` of an epoch gives rank
    ``r`` rows ``[j*world*micro + r*micro, ... + micro)``. Micro-batch ``m`` of the
    stream is micro-batch ``m % per_epoch`` of epoch ``m // per_epoch``.
    """

    def __init__(self, n: int, micro: int, world: int, rank: int, seed: int):
        if n < 1:
            raise ValueError("no training rows")
        self.n, self.micro, self.world, self.rank, self.seed = n, micro, world, rank, seed
        self.per_epoch = math.ceil(n / (micro * world))
        self._epoch: Optional[int] = None
        self._perm: list[int] = []

    def indices(self, m: int) -> list[int]:
        epoch, j = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g).tolist()
            need = self.per_epoch * self.micro * self.world
            self._perm = (perm * math.ceil(need / self.n))[:need]
            self._epoch = epoch
        start = (j * self.world + self.rank) * self.micro
        return self._perm[start:start + self.micro]


def total_steps(tcfg: TrainingConfig, order: DataOrder) -> int:
    if tcfg.max_steps is not None:
        return tcfg.max_steps
    return max(1, math.ceil(tcfg.epochs * order.per_epoch / tcfg.grad_accum))


def lr_lambda(tcfg: TrainingConfig, steps: int) -> Callable[[int], float]:
    warmup = math.ceil(tcfg.warmup_ratio * steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if tcfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        if tcfg.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class _StopFlag:
    """Set by SIGTERM/SIGUSR1/SIGINT; acted on at the next step boundary, agreed across ranks (with whether a
    checkpoint is due by time: ranks' clocks differ, so rank 0's view is everyone's)."""

    def __init__(self):
        self.set = False
        self._old = {}

    def __enter__(self) -> "_StopFlag":
        # SIGINT too: Ctrl-C reaches each rank twice (from the terminal, then from torchrun, which passes
        # it on), so a second one cannot mean "now"; torchrun kills ranks that outlive its shutdown timeout.
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.set = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def agreed(self, device, save_due: bool = False) -> tuple[bool, bool]:
        """(stop now, save now by time) as every rank will act on them: one collective per step."""
        flags = torch.tensor([1 if self.set else 0, 1 if save_due else 0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags[0].item()), bool(flags[1].item())


class MetricsLog:
    """Rank 0's metrics.jsonl, and the trackers of ``training.report_to``; on resume, lines past the
    checkpoint go (the trackers get the steps again from there)."""

    def __init__(self, path: Path, resumed_step: Optional[int], tracker: Optional[Tracker] = None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resumed_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resumed_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.tracker = tracker

    def write(self, record: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record, record["step"])

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _maybe_fault(step: int, rank: int) -> None:
    """Test hook for the resume test: SIGKILL this rank right after ``step`` (and its checkpoint)."""
    spec = os.environ.get("SANDE_TEST_KILL_AT")  # "rank:step"
    if spec and spec == f"{rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def cpu_adam(params: list, ds_config: dict):
    """DeepSpeed's CPU Adam for the config's Adam/AdamW when training runs on the CPU, else None.

    DeepSpeed's own choice there is torch's AdamW (its fused Adam needs CUDA); its CPU Adam, the one
    ZeRO-Offload runs (AVX-512, one fused pass over the states), makes a whole SmolLM2 step
    1.1-1.9x faster, median 1.35x over five runs (benchmarks/optimizer_step.py). The config keeps its
    lr, betas, eps and weight decay.
    """
    opt = ds_config.get("optimizer") or {}
    if torch.cuda.is_available() or opt.get("type", "").lower() not in ("adam", "adamw"):
        return None
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    p = opt.get("params", {})
    return DeepSpeedCPUAdam(params, lr=p["lr"], betas=tuple(p.get("betas", (0.9, 0.999))), eps=p.get("eps", 1e-8),
                            weight_decay=p.get("weight_decay", 0.0), adamw_mode=opt["type"].lower() == "adamw")


def build_engine(module: TrainModule, ds_config: dict, lr_factor: Callable[[int], float]):
    import deepspeed

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"objective {module.objective.name} left no parameter trainable")
    optimizer = cpu_adam(params, ds_config)
    if optimizer is not None:
        ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=None if optimizer else params,
                                           optimizer=optimizer, config=ds_config,
                                           lr_scheduler=lambda opt: LambdaLR(opt, lr_factor))
    return engine


def cpu_autocast(tcfg: TrainingConfig) -> Optional[torch.dtype]:
    """bf16 autocast over fp32 weights for ``training.dtype: bfloat16`` on a CPU (on CUDA DeepSpeed's bf16
    engine runs instead): where the CPU has native bf16, or ``training.cpu_bf16: always``. Elsewhere None,
    and the stage says once that it computes in fp32."""
    from sande_dist.machine import cpu_has_native_bf16

    if tcfg.dtype != "bfloat16" or torch.cuda.is_available():
        return None
    if tcfg.cpu_bf16 == "always" or cpu_has_native_bf16():
        return torch.bfloat16
    if int(os.environ.get("RANK", "0")) == 0:
        print("[sande] training.dtype bfloat16: this CPU has no native bf16 (avx512_bf16, amx_bf16, Arm bf16), "
              "so the stage computes in fp32, many times faster here; --set training.cpu_bf16=always autocasts "
              "anyway", flush=True)
    return None


def prepare_module(model: torch.nn.Module, objective: Objective, tcfg: TrainingConfig) -> TrainModule:
    """The model with the objective's extra modules, its trainable parameters chosen, checkpointing on."""
    torch.manual_seed(tcfg.seed)
    extras = objective.extra_modules(model)
    module = TrainModule(model, objective, extras, autocast=cpu_autocast(tcfg))
    objective.select_trainable(model, module.extras)
    if tcfg.gradient_checkpointing:
        # Reentrant checkpointing needs an input that requires grad when the model itself is frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        if not any(p.requires_grad for p in model.parameters()):
            model.enable_input_require_grads()
    return module


def _optimizer_step(engine, order: DataOrder, samples: Sequence, collate: Callable, step: int, gas: int,
                    device) -> torch.Tensor:
    """One optimizer step over ``gas`` micro-batches; (loss sum, micro-batches, non-pad tokens) of this rank."""
    acc = torch.zeros(3, dtype=torch.float64)
    for k in range(gas):
        idx = order.indices(step * gas + k)
        batch = _to_device(collate([samples[i] for i in idx]), device)
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        acc += torch.tensor([loss.item(), 1.0, float(batch["attention_mask"].sum())], dtype=torch.float64)
    return acc


def _all_ranks(acc: torch.Tensor, device) -> torch.Tensor:
    if dist.is_initialized():  # nccl reduces device tensors only
        acc = acc.to(device)
        dist.all_reduce(acc)
        acc = acc.cpu()
    return acc


def run_loop(model: torch.nn.Module, objective: Objective, samples: Sequence, collate: Callable[[Sequence], dict],
             tcfg: TrainingConfig, ds_config: dict, out_dir: Path, info: DistInfo, resume: bool = True,
             desc: str = "train") -> LoopResult:
    """Train ``model`` with ``objective`` on ``samples``; checkpoints and metrics go under ``out_dir``."""
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    phases = Phases(since=time.time())
    module = prepare_module(model, objective, tcfg)
    order = DataOrder(len(samples), tcfg.micro_batch_size, info.world_size, info.rank, tcfg.seed)
    steps = total_steps(tcfg, order)
    engine = build_engine(module, ds_config, lr_lambda(tcfg, steps))
    phases.mark("engine")
    ckpt = CheckpointManager(Path(out_dir) / "checkpoints", info.rank, tcfg.keep_checkpoints,
                             log=lambda msg: print(f"{info.tag} {msg}", flush=True))
    start = resumed = None
    if resume and (state := ckpt.load_latest(engine, info.world_size)) is not None:
        start = resumed = int(state["step"])
        objective.restore(state.get("objective") or {})
        if info.is_main:
            print(f"{info.tag} resumed {desc} from step {start} of {steps}", flush=True)
    phases.mark("resume")
    step = start or 0
    metrics = None
    if info.is_main:
        tracker = Tracker(tcfg.report_to, Path(out_dir).parent, Path(out_dir).name,
                          tcfg.model_dump(mode="json")) if tcfg.report_to else None
        metrics = MetricsLog(Path(out_dir) / "metrics.jsonl", resumed, tracker)
    bar = None
    if info.is_main:
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=step, desc=f"{desc} [rank 0]", dynamic_ncols=True)
    stopped = False
    early = None
    losses: list[float] = []
    last_save = time.time()
    engine.train()
    with _StopFlag() as stop:
        while step < steps:
            t0 = time.perf_counter()
            lr = engine.get_lr()[0]
            acc = _all_ranks(_optimizer_step(engine, order, samples, collate, step, tcfg.grad_accum, device), device)
            step += 1
            losses.append(acc[0].item() / acc[1].item())  # reduced over ranks: the same everywhere
            if info.is_main:
                elapsed = time.perf_counter() - t0
                norm = engine.get_global_grad_norm()
                record = {"step": step, "of": steps, "loss": acc[0].item() / acc[1].item(), "lr": lr,
                          "grad_norm": float(norm) if norm is not None else None,
                          "tokens": int(acc[2].item()), "tokens_per_s": acc[2].item() / elapsed, "step_time_s": elapsed}
                if step % tcfg.log_steps == 0 or step == steps:
                    metrics.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
            by_time = info.is_main and time.time() - last_save >= 60 * tcfg.save_minutes
            stop_now, save_now = stop.agreed(device, by_time)
            save_now = save_now or bool(tcfg.save_steps and step % tcfg.save_steps == 0)
            if step == steps:  # the export follows at once; a last checkpoint only when asked to keep it
                save_now = tcfg.keep_final_checkpoint
            if stop_now:
                stopped = step < steps
                save_now = True
            # The objective's check comes before this step's checkpoint, which keeps it (a resumed run
            # goes on from the checks it had); not when a stop is asked for, which must not wait on it.
            every = objective.check_every(steps)
            if every and step % every == 0 and step < steps and not stopped:
                record = objective.check(module, step)
                if info.is_main:
                    print(f"\n{info.tag} {desc} check at step {step}: {record}", flush=True)
            if save_now:
                with phases.timed("checkpoint"):
                    ckpt.save(engine, step, {"world_size": info.world_size, "micro_batches_done": step * tcfg.grad_accum,
                                              "total_steps": steps, "seed": tcfg.seed, "objective": objective.state()})
                last_save = time.time()
            _maybe_fault(step, info.rank)
            if not stopped and step < steps and objective.done(step, losses):
                early = step
                if info.is_main:
                    print(f"\n{info.tag} {desc}: done at step {step} of {steps} ({objective.name}'s rule)", flush=True)
                break
            if stopped:
                if info.is_main:
                    print(f"\n{info.tag} stop signal: checkpoint at step {step} saved; exiting", flush=True)
                break
    for closing in (bar, metrics):
        if closing is not None:
            closing.close()
    phases.mark("loop")
    timings = phases.rounded()
    timings["compute"] = round(timings.pop("loop") - timings.get("checkpoint", 0.0), 2)
    return LoopResult(engine, module, step, steps, stopped, resumed, timings, ckpt.bytes_written, early, losses)


@torch.no_grad()
def eval_loss(engine, batches: Iterator[dict]) -> float:
    """Token-weighted mean objective loss over ``batches`` (each rank passes its own share)."""
    engine.eval()
    device = engine.device
    acc = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        loss, tokens = engine(_to_device(batch, device))
        acc += torch.tensor([loss.item() * float(tokens), float(tokens)], dtype=torch.float64)
    if dist.is_initialized():
        acc = acc.to(device)
        dist.all_reduce(acc)
        acc = acc.cpu()
    engine.train()
    return (acc[0] / acc[1]).item()
