"""The lm-evaluation-harness adapter: task names checked up front, a cached-data task really runs offline."""
from __future__ import annotations

import pytest

from sande_dist.errors import InputError
from sande_dist.evaluation.lm_eval_adapter import check_lm_eval_tasks, run_lm_eval, task_manager


def test_unknown_lm_eval_task_is_input_error():
    with pytest.raises(InputError, match="no_such_task"):
        check_lm_eval_tasks(["arc_easy", "no_such_task"], task_manager())


def test_cached_arc_runs_through_lm_eval(tiny_model):
    res = run_lm_eval(str(tiny_model), ["arc_easy_cached"], backend="hf", dtype="float32", limit=8, batch_size=8)
    assert 0.0 <= res["arc_easy_cached"]["acc"] <= 1.0 and "acc_norm" in res["arc_easy_cached"]
