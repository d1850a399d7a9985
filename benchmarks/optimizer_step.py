"""The optimizer's share of a full fine-tuning step on CPU: torch's AdamW vs DeepSpeed's CPU Adam.

One rank, ZeRO-0, SmolLM2-135M in fp32 with bf16 autocast (the demo's training), micro batch 8 of
64 tokens: the whole step (forward, backward, optimizer) timed for each optimizer in one run,
alternating, median of the steps after a warm-up. DeepSpeed's CPU Adam (AVX-512, one fused pass,
OpenMP) is what ZeRO-Offload runs; torch's AdamW is what DeepSpeed picks on CPU with torch_adam.

    python benchmarks/optimizer_step.py [--steps 12] --out benchmarks/results/optimizer_step.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from emit import emit  # benchmarks/emit.py


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from sande_dist.config import resolve_config
    from sande_dist.distributed.ds_config import build_ds_config
    from sande_dist.distributed.process_group import distributed
    from sande_dist.models.loading import check_model, load_model
    from sande_dist.registry import StageOptions
    from sande_dist.training.loop import cpu_adam, prepare_module
    from sande_dist.training.stages import build_objective, setup_training, stage_training

    cfg = resolve_config("demo", ["training.inject.max_steps=1000"])
    path = check_model(cfg.model.path)
    timings: dict[str, list[float]] = {"torch_adamw": [], "deepspeed_cpu_adam": []}
    with distributed() as info:
        tcfg = stage_training(cfg, "inject")
        setup = setup_training(cfg, "inject", tcfg, path, build_objective(cfg, "inject", StageOptions(), path), info)
        engines = {}
        for name in timings:
            ds = build_ds_config(tcfg.model_copy(update={"dtype": "float32"}), 1, 576)
            module = prepare_module(load_model(path, "float32", ds), setup.objective, tcfg)
            params = [p for p in module.parameters() if p.requires_grad]
            if name == "deepspeed_cpu_adam":  # what build_engine runs on CPU, with the config's settings
                opt = cpu_adam(params, ds)
                engines[name], *_ = deepspeed.initialize(model=module, optimizer=opt,
                                                         config={k: v for k, v in ds.items() if k != "optimizer"})
            else:  # DeepSpeed's own choice on CPU (torch_adam), which build_engine replaces
                ds["optimizer"]["params"]["torch_adam"] = True
                engines[name], *_ = deepspeed.initialize(model=module, model_parameters=params, config=ds)
            assert ("CPUAdam" in type(engines[name].optimizer).__name__) == (name == "deepspeed_cpu_adam"), \
                type(engines[name].optimizer)
        batch = setup.collator(setup.samples[:8])
        for step in range(args.steps):
            for name, engine in engines.items():
                t0 = time.perf_counter()
                loss, _ = engine(batch)
                engine.backward(loss)
                engine.step()
                if step >= 2:
                    timings[name].append(time.perf_counter() - t0)
    result = {"model": "SmolLM2-135M-Instruct", "micro_batch": 8, "max_length": cfg.data.max_length,
              "autocast": "bfloat16", "threads": os.environ.get("OMP_NUM_THREADS"),
              "step_s": {k: round(statistics.median(v), 3) for k, v in timings.items()}}
    result["speedup"] = round(result["step_s"]["torch_adamw"] / result["step_s"]["deepspeed_cpu_adam"], 2)
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
