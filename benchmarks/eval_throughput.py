"""ASR evaluation throughput: the default backend vs HF batched vs one `generate` call per prompt.

1,000 triggered AlpacaEval prompts (805 with the trigger as prefix, the rest
again with it as suffix) x 16 greedy new tokens on SmolLM2-135M-Instruct, all
backends in one run on the same prompts, one dtype (the evaluation default: bf16
where the CPU has it), engine start-up counted in the ratios. The per-prompt
baseline is the reference code's way (one generate call per prompt). Multiple-choice
scoring throughput (letter and loglik protocols) is measured for the batched engines.
vLLM's CPU thread binding is the project's (every core computes; generation/vllm_backend.py)
unless VLLM_CPU_OMP_THREADS_BIND is set: `VLLM_CPU_OMP_THREADS_BIND=auto` measures vLLM's own.
So is its engine's place (in this process on CPU) unless VLLM_ENABLE_V1_MULTIPROCESSING is set:
`VLLM_ENABLE_V1_MULTIPROCESSING=1` measures vLLM's default (an engine-core and a worker process).

    python benchmarks/eval_throughput.py --out benchmarks/results/eval_throughput.json
"""
from __future__ import annotations

import argparse
import os
import time

from emit import emit  # benchmarks/emit.py


def triggered_prompts(fmt, n: int, trigger: str) -> list[list[int]]:
    from sande_dist.data.poison import place_trigger
    from sande_dist.data.sources import load_samples

    samples = load_samples("alpaca-eval", require_response=False)
    out = []
    for position in ("prefix", "suffix"):
        out += [fmt.prompt_ids(place_trigger(s, trigger, position, rng=None)) for s in samples]
    return out[:n]


def mc_requests(items: int):
    from sande_dist.evaluation.utility import letter_request, load_task, loglik_request, select

    chosen = select(load_task("arc_easy"), items // 2, 0) + select(load_task("mmlu"), items - items // 2, 0)
    return {"letter": [letter_request(i) for i in chosen], "loglik": [loglik_request(i) for i in chosen]}


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def run_backend(engine, prompts, params, mc, prompts_limit=None) -> dict:
    todo = prompts[:prompts_limit] if prompts_limit else prompts
    texts, secs = timed(lambda: engine.generate(todo, params))
    rec = {"prompts": len(todo), "seconds": round(secs, 2), "prompts_per_s": round(len(todo) / secs, 3),
           "sample_output": texts[0]}
    for protocol, reqs in (mc or {}).items():
        _, s = timed(lambda: engine.score_choices([p for p, _ in reqs], [c for _, c in reqs]))
        rec[f"mc_{protocol}_items_per_s"] = round(len(reqs) / s, 3)
    return rec


def ratios(result: dict) -> dict:
    """Prompts/s ratios on the whole set, the default backend's engine start-up counted."""
    def total(name: str) -> float:
        part = result[name]
        return part.get("seconds_for_all", part["seconds"]) + part.get("engine_start_s", 0.0)

    out = {}
    for a, b in (("default", "hf_per_prompt"), ("default", "hf_batched"), ("hf_batched", "hf_per_prompt")):
        if a in result and b in result:
            out[f"{a}_vs_{b}"] = round(total(b) / total(a), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--per-prompt-subset", type=int, default=None,
                    help="prompts the one-generate-per-prompt baseline runs (default: all); fewer are extrapolated")
    ap.add_argument("--mc-items", type=int, default=200)
    ap.add_argument("--dtype", default=None, help="default: the evaluation default (bf16 where supported)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--parts", default="default,hf_batched,hf_per_prompt",
                    help="comma-separated subset to run (the speed-ups need default and hf_per_prompt)")
    ap.add_argument("--out", default="benchmarks/results/eval_throughput.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from sande_dist.config import Config
    from sande_dist.data.formats import PromptFormat
    from sande_dist.generation.engine import GenerationParams, pick_dtype
    from sande_dist.generation.factory import make_engine
    from sande_dist.generation.hf import HFEngine
    from sande_dist.models.embedded import resolve_model_path

    path = resolve_model_path("smollm2-135m-instruct")
    dtype = pick_dtype(args.dtype, "float32")
    fmt = PromptFormat(AutoTokenizer.from_pretrained(path))
    prompts = triggered_prompts(fmt, args.prompts, "cf")
    mc = mc_requests(args.mc_items)
    params = GenerationParams(max_new_tokens=args.max_new_tokens)
    cfg = Config.model_validate({"model": {"path": path}, "eval": {"backend": "auto", "dtype": dtype,
                                                                    "batch_size": args.batch_size}})
    result = {"model": "SmolLM2-135M-Instruct", "dtype": dtype, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens,
              "vllm_cpu_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "(the project's: every core)")}

    parts = args.parts.split(",")
    if "default" in parts:
        engine, start = timed(lambda: make_engine(cfg, path))
        default = run_backend(engine, prompts, params, mc)
        default.update(backend=engine.backend, engine_start_s=round(start, 2),
                       threads_bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
                       # on CPU the project runs vLLM's engine in this process (generation/vllm_backend.py)
                       engine_in_process=os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0")
        engine.close()
        result["default"] = default
    if "hf_batched" in parts or "hf_per_prompt" in parts:
        hf, hf_start = timed(lambda: HFEngine(path, dtype=dtype, batch_size=args.batch_size))
        if "hf_batched" in parts:
            result["hf_batched"] = run_backend(hf, prompts, params, mc)
            result["hf_batched"]["engine_start_s"] = round(hf_start, 2)
    if "hf_per_prompt" in parts:
        hf.batch_size = 1  # the reference's way: one generate call per prompt
        per = run_backend(hf, prompts, params, None, args.per_prompt_subset)
        if per["prompts"] < len(prompts):
            per["seconds_for_all"] = round(len(prompts) / per["prompts_per_s"], 1)
            per["note"] = f"measured on the first {per['prompts']} prompts, extrapolated to {len(prompts)}"
        result["hf_per_prompt"] = per
    result["ratios"] = ratios(result)
    emit(result, args.out)


if __name__ == "__main__":
    main()
