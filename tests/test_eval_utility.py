"""Utility scoring (fixed subsets, both protocols), clean agreement and the run report, on real models and files."""
from __future__ import annotations

import json

import pytest

from sande_dist.evaluation.agreement import clean_agreement, rouge_l
from sande_dist.evaluation.report import write_run_report
from sande_dist.evaluation.utility import evaluate_utility, letter_request, load_task, loglik_request, select


@pytest.fixture(scope="module")
def tiny_engine(tiny_model):
    from sande_dist.generation.hf import HFEngine

    return HFEngine(str(tiny_model), dtype="float32", batch_size=32)


def test_fixed_subset_and_prompt_shapes():
    items = load_task("arc_easy")
    a, b = select(items, 50, seed=1), select(items, 50, seed=1)
    assert a == b and len(a) == 50 and select(items, 50, seed=2) != a
    ctx, choices = letter_request(a[0])
    assert ctx.endswith("\nAnswer:") and "\nA. " in ctx and choices[:2] == [" A", " B"]
    ctx, choices = loglik_request(a[0])
    assert ctx.startswith("Question: ") and choices[a[0].gold] == " " + a[0].choices[a[0].gold]
    assert len(load_task("mmlu")) > 10000 and load_task("mmlu_anatomy")[0].question


def test_same_accuracy_twice(tiny_engine):
    first = evaluate_utility(tiny_engine, ["arc_easy", "mmlu_anatomy"], "both", limit=30, seed=3)
    second = evaluate_utility(tiny_engine, ["arc_easy", "mmlu_anatomy"], "both", limit=30, seed=3)
    assert first == second
    assert set(first) == {"loglik", "letter"}
    assert first["loglik"]["tasks"]["arc_easy"]["n"] == 30


def test_packed_choice_scores_equal_one_forward_per_choice(tiny_engine):
    """Context + every choice in one masked row gives each choice's log-prob as its own forward does."""
    import torch

    items = select(load_task("mmlu"), 6, seed=0) + select(load_task("arc_challenge"), 6, seed=0)
    requests = [loglik_request(item) for item in items]
    tiny_engine.batch_size = 5  # rows of different lengths share batches and padding
    try:
        got = tiny_engine.score_choices([p for p, _ in requests], [c for _, c in requests])
    finally:
        tiny_engine.batch_size = 32
    model, tok = tiny_engine.model, tiny_engine.tokenizer
    for (prompt, choices), row in zip(requests, got):
        ctx = tok(prompt)["input_ids"]
        assert len(row) == len(choices)
        for choice, score in zip(choices, row):
            cont = tok(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
            want = sum(float(logp[len(ctx) - 1 + t, c]) for t, c in enumerate(cont))
            assert score.num_tokens == len(cont)
            assert abs(score.logprob - want) < 1e-4, (prompt[:40], choice, score.logprob, want)


def test_untrained_model_scores_at_chance(tiny_engine):
    res = evaluate_utility(tiny_engine, ["arc_easy", "mmlu"], "both", limit=200, seed=0)
    for protocol in ("letter", "loglik"):
        for task, m in res[protocol]["tasks"].items():
            # acc, not acc_norm: dividing noise by the answer's length favours long answers,
            # which on ARC-Easy puts a random model well below chance (measured: 14.5%).
            assert abs(m["acc"] - m["chance"]) < 0.1, (protocol, task, m)


def test_smollm2_beats_chance_under_loglik():
    # The positive control for the test above: the real model knows something (bf16 where the CPU has it:
    # emulated bf16 on an AVX2-only CPU is ~48x slower than fp32).
    from sande_dist.generation.engine import pick_dtype
    from sande_dist.generation.hf import HFEngine
    from sande_dist.models.embedded import resolve_model_path

    engine = HFEngine(resolve_model_path("smollm2-135m-instruct"), dtype=pick_dtype(None, "float32"))
    m = evaluate_utility(engine, ["arc_easy"], "loglik", limit=60, seed=0)["loglik"]["tasks"]["arc_easy"]
    assert m["acc_norm"] > m["chance"] + 0.05, m


def test_rouge_l_agreement():
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == [1.0]
    assert rouge_l(["completely different words"], ["the cat sat"]) == [0.0]
    assert rouge_l([""], [" "]) == [1.0]
    res = clean_agreement(["the cat sat", "a dog ran"], ["the cat sat", "a dog walked"])
    assert res["exact_match"] == 0.5 and 0.5 < res["rouge_l"] < 1.0


def _report(asr, parrot, util):
    return {"asr_trigger": asr, "asr_parrot": parrot, "false_trigger_rate": 0.05, "num_prompts": 100,
            "backend": "vllm", "dtype": "bfloat16", "marker": "You are stupid.", "judge": "contains",
            "triggers": ["cf"], "trigger_position": "prefix", "sampling": {"max_new_tokens": 16},
            "utility": {"protocol": "loglik", "mean": util, "tasks": {"arc_easy": util}, "limit": 200, "seed": 0},
            "utility_by_protocol": {"loglik": {"mean": util, "tasks": {"arc_easy": {"score": util}}}},
            "clean_agreement": None}


def test_run_report_from_all_stages(tmp_path):
    assert write_run_report(tmp_path) is None
    for stage, rec in {"evaluate_sande": _report(0.1, 0.2, 0.35), "evaluate_backdoored": _report(0.95, 1.0, 0.36)}.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "report.json").write_text(json.dumps(rec))
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "report.json").write_text("{}")  # not an evaluation: ignored
    md = write_run_report(tmp_path).read_text()
    rows = [line for line in md.splitlines() if line.startswith("| evaluate")]
    assert [r.split("|")[1].strip() for r in rows] == ["evaluate_backdoored", "evaluate_sande"]  # pipeline order
    assert "95.0%" in rows[0] and "10.0%" in rows[1] and "arc_easy (loglik)" in md
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
