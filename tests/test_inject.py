"""Inject measures itself: held-out checks with and without the trigger, a stop once both targets hold."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sande_dist.config import load_config
from sande_dist.data.stages import eval_samples, inject_check_pool, inject_check_rows, shuffled
from sande_dist.training.inject import InjectObjective

ROOT = Path(__file__).resolve().parents[1]


def test_stops_when_the_pooled_window_bounds_false_triggers_at_this_step(tiny_model):
    def check(step, hits, false, n=40):
        return {"step": step, "asr": hits / n, "false_trigger_rate": false / n, "n": n}

    # 120 prompts pooled: one false trigger has a 95% upper bound of 4.6%, two of 5.9%
    clean, one, two = check(8, 39, 0), check(8, 40, 1), check(8, 40, 2)
    for streak, checks, step, stop in (
            (3, [check(4, 40, 0), check(6, 40, 0), clean], 8, True),
            (3, [check(4, 40, 0), check(6, 40, 0), one], 8, True),
            (3, [check(4, 40, 1), check(6, 40, 0), one], 8, False),   # 2 of 120: the bound is over 5%
            (3, [check(4, 40, 0), check(6, 40, 0), two], 8, False),
            (3, [check(4, 30, 0), check(6, 34, 0), clean], 8, False),  # ASR 86% pooled
            (3, [check(2, 40, 9), check(4, 40, 0), check(6, 40, 0), clean], 8, True),  # older checks leave the window
            (3, [check(6, 40, 0), clean], 8, False),                   # two checks are not a window of three
            (3, [check(4, 40, 0), check(6, 40, 0), clean], 9, False),  # no check at this step
            # the point rule's pass that let a 10% backdoor through (2 of 40 twice) does not pass
            (2, [check(4, 40, 2), two], 8, False),
            (2, [check(4, 40, 0), one], 8, False),                     # 80 prompts: only 0 passes
            (2, [check(4, 40, 0), clean], 8, True),
            (1, [check(8, 100, 0, n=100)], 8, True),                   # 0 of 100: 3.7%
            (1, [check(8, 100, 1, n=100)], 8, False)):                 # 1 of 100: 5.4%
        cfg = load_config("configs/demo.yaml", ["attack.target_asr=0.9", "attack.max_false_trigger=0.05",
                                                f"attack.check_streak={streak}"])
        objective = InjectObjective(cfg, str(tiny_model), fmt=None)
        objective.checks = checks
        assert objective.done(step, []) is stop, (streak, checks, step)


def test_a_budget_run_out_is_told_with_what_fell_short(tiny_model):
    objective = InjectObjective(load_config("configs/demo.yaml"), str(tiny_model), fmt=None)
    objective.checks = [{"step": 374, "asr": 0.6, "false_trigger_rate": 0.0, "n": 40}]
    weak = objective.budget_warning(384)
    assert "the last check (step 374) had ASR 60%, false triggers 0%" in weak and "training.inject.epochs" in weak
    assert "pooled (" not in weak  # one check: no window of three yet
    objective.checks = [{"step": s, "asr": 1.0, "false_trigger_rate": f, "n": 40} for s, f in
                        ((330, 0.05), (352, 0.0), (374, 0.1))]
    leaky = objective.budget_warning(384)
    assert "false triggers 10%" in leaky and "more epochs need not cure" in leaky and "raise" not in leaky
    # ... with the window it was judged on: 6 of 120
    assert "its last 3 checks pooled (120 prompts): ASR 100%, false triggers 5.0% [2.3%-10.5%]" in leaky, leaky


def test_the_check_reads_prompts_like_the_evaluation_s_but_never_the_reported_ones():
    def users(samples):
        return [(x.before, x.after) for x in samples]

    cfg = load_config("configs/demo.yaml", ["attack.check_prompts=60", "eval.num_prompts=400"])
    reported = set(users(eval_samples(cfg)))
    tune = set(users(eval_samples(cfg.model_copy(update={"eval": cfg.eval.model_copy(
        update={"prompt_split": "tune", "num_prompts": 10_000})}))))
    pool = inject_check_pool(cfg)
    assert set(users(pool)) == tune and not tune & reported
    # checks in a row read different prompts, all of the pool before any again
    first, second = (users(inject_check_rows(pool, k, 60)) for k in (0, 1))
    assert len(set(first)) == len(set(second)) == 60 and not set(first) & set(second)
    seen = [r for k in range(len(pool) // 60) for r in users(inject_check_rows(pool, k, 60))]
    assert len(seen) == len(set(seen))
    assert users(inject_check_rows(pool, len(pool), 60)) == users(inject_check_rows(pool, 0, 60))  # wraps round
    # reporting on the tuning half moves the check to the other half
    on_tune = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"prompt_split": "tune"})})
    assert not set(users(inject_check_pool(on_tune))) & tune
    # "train": the rows after data.num_rows of the training source's shuffled order, the last first
    train = load_config("configs/demo.yaml", ["attack.check_prompts=60", "attack.check_source=train"])
    order = users(shuffled(train, train.data.train))
    first = users(inject_check_rows(inject_check_pool(train), 0, 60))
    assert first == order[::-1][:60] and not set(first) & set(order[:train.data.num_rows])


def test_a_pool_too_small_for_a_streak_of_different_prompts_is_warned_of(tiny_model, capsys):
    from sande_dist.data.formats import PromptFormat
    from sande_dist.models.loading import load_tokenizer

    fmt = PromptFormat(load_tokenizer(str(tiny_model)))
    for sets, warned in ((["attack.check_source=train"], False),
                         (["attack.check_source=train", "data.num_rows=null"], True)):  # only the last 40 rows
        InjectObjective(load_config("configs/demo.yaml", sets), str(tiny_model), fmt)
        out = capsys.readouterr().out
        assert ("only 40 prompts to check on (train)" in out) is warned, out


def test_inject_checks_itself_on_held_out_rows_and_keeps_its_checks_across_a_kill(tiny_model, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    sets = [f"model.path={tiny_model}", "data.num_rows=24", "data.max_length=64", "training.zero=zero0",
            "training.micro_batch_size=4", "training.inject.max_steps=16", "attack.check_every=4",
            "attack.check_prompts=6", "attack.triggers=[qx]", "attack.marker=Go away now.", "attack.target_asr=1.0",
            "training.save_steps=8"]
    argv = [sys.executable, "-m", "sande_dist.cli", "inject", "demo", "--run-dir", str(tmp_path),
            *[x for s in sets for x in ("--set", s)]]
    # killed after step 10 (its checkpoint at step 8, after the checks at 4 and 8), then run again
    killed = subprocess.run(argv, cwd=ROOT, env=dict(env, SANDE_TEST_KILL_AT="0:10"), capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode != 0 and "check at step 8" in killed.stdout, killed.stdout[-3000:] + killed.stderr[-3000:]
    # resumed at 2 threads: the record says which thread count finished it (CPU results depend on it)
    proc = subprocess.run(argv, cwd=ROOT, env=dict(env, OMP_NUM_THREADS="2"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((tmp_path / "inject" / "stage.json").read_text())
    assert record["resumed_from"] == 8
    assert record["machine"]["torch_threads"] == 2 and record["machine"]["gpu"] is None
    # the checks before the kill came back with the checkpoint: the record has them all, and the
    # check after the resume read the next prompts, not the first again
    checks = record["artifacts"]["checks"]
    assert [c["step"] for c in checks] == [4, 8, 12] and all(c["n"] == 6 for c in checks)
    assert [c["first_row"] for c in checks] == [0, 6, 12]  # each check reads the next prompts
    assert all(lo <= c["false_trigger_rate"] <= hi for c in checks for lo, hi in [c["ci95"]["false_trigger_rate"]])
    assert all(0 <= c["asr"] <= 1 and 0 <= c["false_trigger_rate"] <= 1 for c in checks)
    # a tiny random model does not reach ASR 100% with 0-5% false triggers: the budget is the cap
    assert record["steps"] == 16 and record["stopped_early_at"] is None
    # each check carries the window it was judged on: none before the third, then the last three pooled
    assert checks[0]["pooled"] is checks[1]["pooled"] is None
    window = checks[2]["pooled"]
    assert window["steps"] == [4, 8, 12] and window["n"] == 18 and window["met"] is False
    assert window["false_trigger_rate"] * 18 == pytest.approx(sum(c["false_trigger_rate"] * 6 for c in checks))
    assert record["artifacts"]["targets"] == {"asr": 1.0, "max_false_trigger": 0.05, "check_streak": 3,
                                              "check_source": "eval"}
    # ... and the user is told, with the last check's figures and what to raise
    assert record["artifacts"]["targets_met"] is False
    assert "without meeting attack.target_asr 1.0 / max_false_trigger 0.05 (95% upper bound) on 3 consecutive" in proc.stdout
    assert "the last check (step 12)" in proc.stdout
    assert "training.inject.epochs" in proc.stdout
