"""One command that checks the GPU paths the 7B/70B configs take, and times them (≤ 10 min on one H200).

    python benchmarks/gpu_check.py [--out gpu_check.json] [--budget-s 540]
    python benchmarks/gpu_check.py --dry-run      # the same parts, tiny and on CPU (what CI runs)

Parts, each in its own process (vLLM and DeepSpeed never share one), each through the
project's own stage code:
- ``train``: `sande inject`'s code on a random-initialised ~1B Llama (SmolLM2's vocabulary),
  DeepSpeed ZeRO-3 in bf16, with flash-attn and with sdpa: tokens/s and MFU (6 x params x
  tokens / 989 TFLOP/s dense bf16), the step time, and the sharded export's time;
- ``simulate``: `sande simulate`'s code on that model (frozen, one parrot): step time;
- ``vllm``: CUDA vLLM on SmolLM2 from the cache, bf16, 1,000 prompts x 16 tokens, start-up
  counted: prompts/s; greedy agreement with the HF backend on 100 of them; and prompt-embeds
  agreement: a parrot made of a trigger's own embeddings must generate what the trigger's
  token ids generate, on both engines.
No network: the models are made from a config or read from the sande-dist cache (`make setup`).
Prints one JSON object; a part that fails or does not fit the budget says why in it.
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

from emit import emit  # benchmarks/emit.py

ROOT = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 989.0  # H100/H200 dense bf16
# ~1.0B parameters, Llama shape, SmolLM2's tokenizer.
GPU_SHAPE = {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
             "intermediate_size": 5632}
CPU_SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
             "intermediate_size": 128}


def _make_model(folder: Path, shape: dict, dtype: str) -> int:
    """A random Llama at ``folder`` with SmolLM2's tokenizer; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sande_dist.models.embedded import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def part_train(args) -> dict:
    """The inject and simulate stages' own code on the model, under the launcher's ranks."""
    from sande_dist.config import resolve_config
    from sande_dist.distributed.process_group import distributed
    from sande_dist.registry import StageOptions
    from sande_dist.timing import stage_starts_now
    from sande_dist.training.stages import run_stage

    run = Path(args.work) / f"run-{args.attn}"
    # inject takes 600 of alpaca-demo's 999 rows; simulate trains on the rest (the defender's rows)
    sets = [f"model.path={args.model}", f"model.attn_implementation={args.attn}", "data.num_rows=600",
            "data.max_length=1024", f"training.zero={args.zero}", f"training.dtype={args.dtype}",
            f"training.micro_batch_size={args.micro_batch}", "training.grad_accum=1",
            f"training.max_steps={args.steps}", "training.warmup_ratio=0", "training.save_steps=100000",
            "training.gradient_checkpointing=true", f"training.simulate.max_steps={args.steps}",
            "removal.parrot_tokens=6"]
    cfg = resolve_config(None, sets, run_dir=str(run))
    out = {}
    with distributed():  # one process group for both stages (DeepSpeed keeps the first one it sees)
        for kind in ("inject", "simulate"):
            t0 = time.time()
            stage_starts_now()
            run_stage(cfg, kind, StageOptions())
            out[kind] = {"wall_s": round(time.time() - t0, 1)}
            if os.environ.get("RANK", "0") == "0":
                rows = [json.loads(x) for x in (run / kind / "metrics.jsonl").read_text().splitlines()]
                steady = rows[min(3, len(rows) - 1):]  # the first steps warm up kernels and allocators
                record = json.loads((run / kind / "stage.json").read_text())
                out[kind].update({
                    "step_time_s": round(sum(r["step_time_s"] for r in steady) / len(steady), 4),
                    "tokens_per_s": round(sum(r["tokens_per_s"] for r in steady) / len(steady), 1),
                    "timings": record.get("timings"), "deepspeed": record.get("deepspeed")})
    if os.environ.get("RANK", "0") == "0":
        Path(args.result).write_text(json.dumps(out))
    return out


def part_vllm(args) -> dict:
    """CUDA vLLM vs HF on SmolLM2: throughput, greedy agreement, prompt-embeds agreement."""
    import torch

    from sande_dist.config import resolve_config
    from sande_dist.data.formats import PromptFormat
    from sande_dist.data.poison import place_trigger
    from sande_dist.data.sources import load_samples
    from sande_dist.evaluation.stage import parrot_request
    from sande_dist.generation.engine import GenerationParams, load_input_embeddings
    from sande_dist.generation.factory import make_engine
    from sande_dist.models.loading import check_model, load_tokenizer

    model = check_model("smollm2-135m-instruct")
    fmt = PromptFormat(load_tokenizer(model))
    samples = load_samples("alpaca-eval", require_response=False)
    prompts = [fmt.prompt_ids(s.clean()) for s in (samples * 2)[:args.prompts]]
    table = load_input_embeddings(model)
    splice_ids, splice_embeds = [], []
    for s in samples[:16]:
        trig = place_trigger(s.clean(), "cf", "prefix", None)
        splice_ids.append(fmt.prompt_ids(trig))
        splice_embeds.append(parrot_request(fmt, table, s.clean(), table[torch.tensor(fmt.trigger_ids(trig))], "prefix"))
    params = GenerationParams(max_new_tokens=16)
    out = {}
    for backend in ("vllm", "hf"):
        cfg = resolve_config(None, [f"eval.backend={backend}", f"eval.dtype={args.dtype}", "eval.batch_size=64"])
        t0 = time.time()
        with make_engine(cfg, model) as engine:
            start = time.time() - t0
            n = args.prompts if backend == "vllm" else min(args.prompts, 100)
            t1 = time.time()
            texts = engine.generate(prompts[:n], params)
            gen = time.time() - t1
            out[backend] = {"engine_start_s": round(start, 1), "prompts": n, "generate_s": round(gen, 1),
                            "prompts_per_s_with_start": round(n / (start + gen), 2),
                            "splice_agree": sum(a == b for a, b in zip(engine.generate(splice_ids, params),
                                                                       engine.generate(splice_embeds, params))) / 16,
                            "texts": texts[:100]}
    hf, vl = out["hf"].pop("texts"), out["vllm"].pop("texts")
    out["greedy_agreement_100"] = sum(a == b for a, b in zip(hf, vl)) / len(hf)
    Path(args.result).write_text(json.dumps(out))
    return out


def _launch(argv: list[str], nproc: int, timeout: float) -> tuple[dict, str]:
    result = Path(tempfile.mkstemp(suffix=".json")[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29577",
           __file__] if nproc else [sys.executable, __file__]
    try:
        proc = subprocess.run([*cmd, *argv, "--result", str(result)], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {}, f"did not finish in {timeout:.0f} s"
    if proc.returncode != 0 or not result.read_text():
        return {}, (proc.stdout + proc.stderr)[-1500:]
    return json.loads(result.read_text()), ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", nargs="?", choices=["train", "vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--dry-run", action="store_true", help="tiny model, CPU, few steps: the code paths only")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--budget-s", type=float, default=540.0)
    for name, default in (("--model", ""), ("--work", ""), ("--result", ""), ("--attn", "sdpa"), ("--zero", "zero3"),
                          ("--dtype", "bfloat16")):
        ap.add_argument(name, default=default, help=argparse.SUPPRESS)
    for name, default in (("--steps", 20), ("--micro-batch", 8), ("--prompts", 1000)):
        ap.add_argument(name, type=int, default=default, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part == "train":
        return 0 if part_train(args) is not None else 1
    if args.part == "vllm":
        return 0 if part_vllm(args) is not None else 1

    import torch

    started = time.time()
    cuda = torch.cuda.is_available() and not args.dry_run
    report: dict = {"dry_run": not cuda, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                    "torch": torch.__version__, "parts": {}, "problems": {}}
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    model = work / "model"
    params = _make_model(model, GPU_SHAPE if cuda else CPU_SHAPE, "bfloat16" if cuda else "float32")
    report["params"] = params
    train_args = ["train", "--model", str(model), "--work", str(work), "--steps", "20" if cuda else "3",
                  "--micro-batch", "8" if cuda else "2", "--dtype", "bfloat16"]
    try:
        import flash_attn  # noqa: F401  (installed or not: that is the question here)
        attns = ["flash_attention_2", "sdpa"] if cuda else ["sdpa"]
    except ImportError:
        attns = ["sdpa"]
        report["problems"]["flash_attn"] = "not installed: only sdpa measured"
    for attn in attns:
        left = args.budget_s - (time.time() - started)
        got, why = _launch([*train_args, "--attn", attn], nproc=1, timeout=max(60.0, left - 120))
        if why:
            report["problems"][f"train_{attn}"] = why
            continue
        if cuda:
            tps = got["inject"]["tokens_per_s"]
            got["inject"]["mfu"] = round(6 * params * tps / (PEAK_TFLOPS * 1e12), 3)
        report["parts"][f"train_{attn}"] = got
    if cuda:
        left = args.budget_s - (time.time() - started)
        got, why = _launch(["vllm", "--dtype", "bfloat16", "--prompts", "1000"], nproc=0, timeout=max(60.0, left))
        report["parts" if not why else "problems"]["vllm"] = got or why
    else:
        report["problems"]["vllm"] = "CUDA vLLM needs a GPU (dry run)"
    report["wall_s"] = round(time.time() - started, 1)
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
