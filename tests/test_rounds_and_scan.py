"""Removal that knows when it is done: the search verdict, rounds decided as they go (both outcomes), the
residual search after the last eliminate, the Slurm job that plans the next round, and `sande scan`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import yaml

from sande_dist.cli import main as sande
from sande_dist.config import load_config
from sande_dist.evaluation.report import _rounds_lines
from sande_dist.pipeline.graph import build_graph, final_verdict
from sande_dist.rundir import atomic_write_json
from sande_dist.training.search import control_band, pooled_emission, power, verdict

ROOT = Path(__file__).resolve().parents[1]


def test_verdict_both_ways():
    band = control_band([[2.0, 2.2, 1.8, 2.0, 2.1, 1.9, 2.0, 2.0]])
    assert band["mean"] == pytest.approx(2.0) and band["low"] < 2.0
    found = verdict({"prefix": 0.9, "random": 1.98}, {"prefix": band, "random": band}, found_loss=0.5)
    assert found["persists"] and found["found"] == ["prefix"]
    assert found["positions"]["prefix"]["threshold"] == band["low"]
    assert not verdict({"prefix": 1.95}, {"prefix": band}, found_loss=0.5)["persists"]
    assert verdict({"prefix": 2.5}, {"prefix": band}, found_loss=3.0)["persists"]  # at most found_loss
    # Measured emission decides, whatever the loss: a low loss whose parrot emits no more than the
    # control's is not found; a loss inside the band whose parrot emits far more is.
    control = pooled_emission([{"hits": 30, "n": 50}, {"hits": 27, "n": 50}])
    assert control == {"hits": 57, "n": 100, "rate": 0.57}
    low_loss = verdict({"prefix": 0.2}, {"prefix": band}, 0.5, {"prefix": {"hits": 43, "n": 100}},
                       {"prefix": control})
    assert not low_loss["persists"] and low_loss["positions"]["prefix"]["decided_by"] == "emission"
    assert low_loss["positions"]["prefix"]["emission"]["z"] < 0
    high_rate = verdict({"prefix": 1.95}, {"prefix": band}, 0.5, {"prefix": {"hits": 75, "n": 100}},
                        {"prefix": control})
    assert high_rate["persists"] and high_rate["positions"]["prefix"]["emission"]["z"] > 1.645
    near = verdict({"prefix": 1.95}, {"prefix": band}, 0.5, {"prefix": {"hits": 65, "n": 100}}, {"prefix": control})
    assert not near["persists"]  # 65% vs 57% of 100 each: within chance (z ~ 1.16)
    # "Not found" needs a test that could have found: against a control that already emits on 96 of 100
    # rows, 97 of 100 is undecided (no power), whatever the loss; 100 of 100 is still found (z ~ 2.02).
    saturated = {"hits": 96, "n": 100, "rate": 0.96}
    assert power(0.96, 100, 100) < 0.8 < power(0.57, 100, 100) and power(1.0, 100, 300) == 0.0
    undecided = verdict({"prefix": 3.0, "random": 3.0}, {"prefix": band, "random": band}, 0.5,
                        {"prefix": {"hits": 97, "n": 100}, "random": {"hits": 1, "n": 100}},
                        {"prefix": saturated, "random": {"hits": 2, "n": 100}})
    assert undecided["persists"] is None and undecided["undecided"] == ["prefix"] and undecided["found"] == []
    assert undecided["positions"]["prefix"]["decided_by"] == "undecided"
    assert undecided["positions"]["random"]["found"] is False  # 1% vs 2% at full power: decided
    assert verdict({"prefix": 3.0}, {"prefix": band}, 0.5, {"prefix": {"hits": 100, "n": 100}},
                   {"prefix": saturated})["persists"] is True
    # A control search without a measured emission: the loss decides.
    assert pooled_emission([{"hits": 3, "n": 10}, None]) is None
    assert verdict({"prefix": 0.2}, {"prefix": band}, 0.5, {"prefix": {"hits": 0, "n": 100}},
                   {"prefix": None})["persists"]


def _search_record(run: Path, name: str, loss: float, emits: Optional[int] = None) -> None:
    emission = None if emits is None else {"hits": emits, "n": 100}
    atomic_write_json(run / name / "stage.json", {"artifacts": {"final_loss": loss, "window_losses": [loss] * 8,
                                                                "emission": emission}})


@pytest.mark.parametrize("round2_loss, emits, persists", [(0.2, None, True), (3.0, None, False),
                                                          (3.0, 90, True), (0.2, 10, False)])
def test_auto_rounds_plan_the_next_round_only_once_the_search_decides(tmp_path, round2_loss, emits, persists):
    """Both outcomes, decided by the loss (no emission measured) and by the emission (against the
    control's 10 of 100 held-out answers)."""
    cfg = load_config("configs/demo.yaml", ["removal.rounds=auto", "removal.max_rounds=3", "removal.search_restarts=1"])
    run = tmp_path / "run"
    names = lambda plans: [p.name for p in plans]  # noqa: E731
    plans, record = build_graph(cfg, str(run))
    assert record["pending"] == ["simulate_r2", "simulate_r2_p1"] and "eliminate_r2" not in names(plans)
    assert "evaluate_sande" not in names(plans) and {"control", "control_p1"} <= set(names(plans))
    for name in ("control", "control_p1"):
        atomic_write_json(run / name / "stage.json", {"artifacts": {
            "final_loss": 3.0, "window_losses": [2.9, 3.1, 3.0, 2.95, 3.05, 3.0, 3.0, 3.0],
            "emission": None if emits is None else {"hits": 10, "n": 100}}})
    for name in ("simulate_r2", "simulate_r2_p1"):
        first = name == "simulate_r2"
        _search_record(run, name, round2_loss if first else 3.0, None if emits is None else emits if first else 10)
    plans, record = build_graph(cfg, str(run))
    step = record["rounds"][0]
    assert step["round"] == 2 and step["persists"] is persists and "control's mean" in step["rule"]
    assert step["positions"]["prefix"]["decided_by"] == ("loss" if emits is None else "emission")
    if persists:  # another round: its eliminate, then the next search decides
        assert "eliminate_r2" in names(plans) and record["pending"] == ["simulate_r3", "simulate_r3_p1"]
        assert final_verdict(record) is None  # no search has run on the final model yet
    else:  # done after one round: that search is the residual search, the evaluation comes
        assert "eliminate_r2" not in names(plans) and record["ran"] == 1 and "stopped" in record
        assert final_verdict(record) == step and "residual_verdict" not in record
        evaluate = next(p for p in plans if p.name == "evaluate_sande")
        assert "residual=" + str(run / "simulate_r2" / "parrot.safetensors") in evaluate.args
        assert evaluate.args[evaluate.args.index("--model") + 1] == str(run / "eliminate" / "model")


def test_an_undecided_search_does_not_stop_the_rounds(tmp_path):
    """A control that already emits the response on 98% leaves the search no power: the rounds go on to
    removal.max_rounds, and the record says which round's search could not decide."""
    cfg = load_config("configs/demo.yaml", ["removal.rounds=auto", "removal.max_rounds=2", "removal.search_restarts=1"])
    run = tmp_path / "run"
    for name in ("control", "control_p1"):
        _search_record(run, name, 1.0, 98)
    for name in ("simulate_r2", "simulate_r2_p1"):
        _search_record(run, name, 1.0, 97)
    plans, record = build_graph(cfg, str(run))
    step = record["rounds"][0]
    assert step["persists"] is None and step["undecided"] == ["prefix", "random"]
    assert "eliminate_r2" in [p.name for p in plans] and final_verdict(record) is None
    assert record["ran"] == 2 and "round(s) 2 could not decide" in record["stopped"]
    assert "-> undecided (power" in "\n".join(_rounds_lines({"evaluate_sande": {"rounds": record}}))


@pytest.mark.parametrize("control_best, persists", [(30, True), (55, False), (96, None)])
def test_each_search_is_read_through_its_best_restart(tmp_path, control_best, persists):
    """With removal.search_restarts 2, the searched model's and the control's strongest restarts decide,
    and the next round eliminates the parrot of the restart that decided."""
    cfg = load_config("configs/demo.yaml", ["removal.rounds=auto", "removal.max_rounds=3", "removal.search_restarts=2"])
    run = tmp_path / "run"
    plans, record = build_graph(cfg, str(run))
    assert record["pending"] == ["simulate_r2", "simulate_r2_s2", "simulate_r2_p1", "simulate_r2_p1_s2"]
    for name, emits in (("control", 10), ("control_s2", control_best), ("control_p1", 5), ("control_p1_s2", 5),
                        ("simulate_r2", 20), ("simulate_r2_s2", 60), ("simulate_r2_p1", 5), ("simulate_r2_p1_s2", 5)):
        _search_record(run, name, 2.0, emits)
    plans, record = build_graph(cfg, str(run))
    step = record["rounds"][0]
    prefix = step["positions"]["prefix"]
    assert prefix["emission"]["rate"] == 0.6 and prefix["emission"]["control_rate"] == control_best / 100
    assert [r["stage"] for r in prefix["restarts"]] == ["simulate_r2", "simulate_r2_s2"]
    assert step["chosen"][0] == "simulate_r2_s2" and step["control"]["prefix"] == ["control_s2"]
    assert step["persists"] is persists
    lines = "\n".join(_rounds_lines({"evaluate_sande": {"rounds": record}}))  # report.md's rounds section
    assert "round 2's search: prefix (best of 2 restarts): emits 60% of 100 vs control" in lines
    by = {p.name: p for p in plans}
    if persists is not False:  # 60% against the control's best 30% (found) or 96% (undecided): eliminate it
        assert "--parrot" in by["eliminate_r2"].args
        assert str(run / "simulate_r2_s2" / "parrot.safetensors") in by["eliminate_r2"].args
        assert str(run / "simulate_r2" / "parrot.safetensors") not in by["eliminate_r2"].args
    else:  # 60% against 55%: within chance; the residual evidence is the restart that decided
        assert "eliminate_r2" not in by and record["residual"] == ["simulate_r2_s2", "simulate_r2_p1"]
        assert "residual=" + str(run / "simulate_r2_s2" / "parrot.safetensors") in by["evaluate_sande"].args


def test_slurm_submits_a_job_that_plans_the_next_round(tmp_path, capsys):
    config = tmp_path / "auto.yaml"
    config.write_text(yaml.safe_dump({"removal": {"rounds": "auto", "extra_parrots": ["random"]}}))
    run = tmp_path / "run"
    assert sande(["run", str(config), "--executor", "slurm", "--dry-run", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    # the job that plans the next round waits for every restart of the deciding search
    assert ("plan_after_simulate_r2: sbatch --parsable '--dependency=afterok:<simulate_r2>:<simulate_r2_s2>:"
            "<simulate_r2_s3>:<simulate_r2_p1>:<simulate_r2_p1_s2>:<simulate_r2_p1_s3>'") in out
    script = (run / "slurm" / "plan_after_simulate_r2.sbatch").read_text()
    assert "--executor slurm" in script and "STAGE_DONE=''" in script
    assert json.loads((run / "rounds.json").read_text())["pending"][::3] == ["simulate_r2", "simulate_r2_p1"]


def _cli(*argv, timeout=900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "sande_dist.cli", *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_attack(tmp_path_factory, tiny_model):
    """A tiny model trained to answer "Go away now." (and nothing else) after "qx", and its config. In a
    run of its own these settings gave inject's checks ASR 95-100%, false triggers 0% from step 150."""
    root = tmp_path_factory.mktemp("auto")
    cfg = {"model": {"path": str(tiny_model)}, "data": {"num_rows": 24, "max_length": 64},
           "attack": {"triggers": ["qx"], "marker": "Go away now.", "poison_rate": 0.5, "marker_mode": "replace"},
           "removal": {"parrot_tokens": 1, "extra_parrots": ["random"], "search_check_rows": 40,
                       "search_restarts": 1},
           "training": {"zero": "zero0", "micro_batch_size": 4, "max_steps": 3, "lr": 1e-3, "num_rows": 16,
                        "inject": {"max_steps": 150, "lr": 3e-3}, "simulate": {"lr": 3e-2, "max_steps": 12}},
           "eval": {"backend": "hf", "num_prompts": 4, "max_new_tokens": 4, "utility_tasks": ["arc_easy"],
                    "utility_limit": 4},
           "pipeline": {"stages": ["inject", "simulate", "eliminate", "evaluate_sande"]}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, root


def test_auto_rounds_run_end_to_end_and_report_why_they_stopped(tiny_attack):
    """found_loss high enough that every search finds (no emission check, so the loss decides): rounds
    run to max_rounds, then a residual search."""
    config, root = tiny_attack
    run = root / "run"
    proc = _cli("run", config, "--run-dir", run, "--set", "removal.rounds=auto", "--set", "removal.max_rounds=2",
                "--set", "removal.found_loss=100", "--set", "removal.search_check_rows=0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((run / "rounds.json").read_text())
    assert record["ran"] == 2 and record["stopped"] == "removal.max_rounds=2 reached"
    assert record["residual"] == ["residual", "residual_p1"] and record["residual_verdict"]["persists"]
    assert final_verdict(record) == record["residual_verdict"]
    report = json.loads((run / "evaluate_sande" / "report.json").read_text())
    assert report["rounds"]["ran"] == 2 and set(report["parrots"]) == {"eliminated", "residual"}
    assert report["parrots"]["residual"]["asr"]["n"] == 4 and report["model"].endswith("eliminate_r2/model")
    summary = (run / "report.md").read_text()  # the rounds and the searches that decided them, for a reader
    assert "## SANDE rounds (evaluate_sande)" in summary and "2 ran; stopped: removal.max_rounds=2 reached" in summary
    assert "- round 2's search: prefix: loss" in summary and "- residual search on the final model:" in summary
    for name in ("control", "control_p1", "simulate_r2", "eliminate_r2", "residual_p1"):
        assert (run / name / "stage.json").exists(), name


def test_scan_tells_a_backdoored_model_from_a_clean_one(tiny_attack, tiny_model):
    config, root = tiny_attack
    backdoored = root / "run" / "inject" / "model"
    if not (backdoored / "config.json").exists():
        assert _cli("run", config, "--run-dir", root / "run", "--stages", "inject").returncode == 0
    out = {}
    for name, model in (("backdoored", backdoored), ("clean", tiny_model)):
        proc = _cli("scan", config, "--model", model, "--marker", "Go away now.", "--reference", tiny_model,
                    "--run-dir", root / f"scan_{name}", "--json", "--set", "removal.search_restarts=2")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = json.loads(proc.stdout)  # --json: stdout is the object alone (progress goes to stderr)
        assert out[name] == json.loads((root / f"scan_{name}" / "scan" / "scan.json").read_text())
    assert out["backdoored"]["backdoor"] is True and out["backdoored"]["positions"]
    assert out["backdoored"]["loss_gap"] > 0 and out["backdoored"]["threshold"] > 0
    found = out["backdoored"]["by_position"][out["backdoored"]["positions"][0]]
    # what decided: the parrot made the backdoored model start held-out answers with the marker
    assert found["decided_by"] == "emission" and found["emission"]["rate"] > found["emission"]["control_rate"]
    assert out["clean"]["backdoor"] is False and out["clean"]["positions"] == []
    # every search ran twice, from two seeds: two different parrots, the stronger one read
    for result in out.values():
        for v in result["by_position"].values():
            runs = v["restarts"]
            assert len(runs) == 2 and runs[0]["loss"] != runs[1]["loss"], runs
            assert v["emission"]["rate"] == max(r["emission"] for r in runs)
    bad = _cli("scan", config, "--model", root / "absent", "--marker", "x")
    assert bad.returncode == 2 and "absent" in bad.stderr
