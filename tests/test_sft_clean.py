"""The clean-SFT control: a removal method that is one file plus one registry entry, run by the pipeline."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from sande_dist.config import load_config
from sande_dist.pipeline.graph import build_plan
from sande_dist.training.stages import stage_samples, stage_training

ROOT = Path(__file__).resolve().parents[1]


def test_trains_eliminates_rows_and_steps_without_a_parrot():
    cfg = load_config("configs/demo.yaml", ["training.eliminate.num_rows=40", "removal.clean_mix=0.25"])
    eliminate, control = stage_samples(cfg, "eliminate", "R"), stage_samples(cfg, "sft_clean", "R")
    assert len(control) == len(eliminate) == 50
    assert [s.user for s in control] == [s.clean().user for s in eliminate]  # same rows, same order
    assert [s.response for s in control] == [s.response for s in eliminate]
    assert all(not s.parrot for s in control) and sum(s.parrot for s in eliminate) == 40
    t_eli, t_ctl = stage_training(cfg, "eliminate"), stage_training(cfg, "sft_clean")
    assert (t_ctl.lr, t_ctl.num_rows) == (t_eli.lr, t_eli.num_rows) == (2e-4, 40)
    assert t_ctl.epochs == t_eli.epochs * cfg.removal.rounds  # as many steps as all SANDE rounds
    own = stage_training(load_config("configs/demo.yaml", ["training.sft_clean.lr=1e-5", "training.max_steps=3"]),
                         "sft_clean")
    assert own.lr == 1e-5 and own.max_steps == 3 * 2


def test_pipeline_wires_it_like_osft():
    cfg = load_config(None, ["pipeline.stages=[inject, sft_clean, evaluate_sft_clean, osft]"])
    plans = {p.name: p for p in build_plan(cfg, "R")}
    assert list(plans) == ["inject", "osft", "sft_clean", "evaluate_sft_clean"]
    assert plans["sft_clean"].args == ["--model", "R/inject/model"] and plans["sft_clean"].deps == ["inject"]
    assert plans["evaluate_sft_clean"].args[:2] == ["--model", "R/sft_clean/model"]
    assert plans["sft_clean"].distributed
    # not in the default pipeline: a control is added where a figure needs it
    assert "sft_clean" not in load_config(None).pipeline.stages
    # it reads eliminate's settings, so they rerun it
    again = {p.name: p for p in build_plan(load_config(None, ["pipeline.stages=[inject, sft_clean]",
                                                              "training.eliminate.lr=0.5"]), "R")}
    assert again["sft_clean"].key != plans["sft_clean"].key and again["inject"].key == plans["inject"].key


def test_runs_and_is_evaluated_in_sande_run(tmp_path, tiny_model):
    cfg = {"model": {"path": str(tiny_model)}, "data": {"num_rows": 12, "max_length": 64},
           "training": {"zero": "zero0", "micro_batch_size": 4, "lr": 1e-3, "eliminate": {"max_steps": 2}},
           "removal": {"rounds": 2},
           "eval": {"backend": "hf", "num_prompts": 4, "max_new_tokens": 4, "utility_tasks": ["arc_easy"],
                    "utility_limit": 4},
           "pipeline": {"stages": ["sft_clean", "evaluate_sft_clean"]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "sande_dist.cli", "run", str(path), "--run-dir", str(run)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((run / "sft_clean" / "stage.json").read_text())
    assert record["steps"] == 4  # 2 rounds x eliminate's 2 steps
    assert (run / "sft_clean" / "model" / "config.json").exists()
    report = json.loads((run / "evaluate_sft_clean" / "report.json").read_text())
    assert report["model"] == str(run / "sft_clean" / "model") and report["num_prompts"] == 4
    assert "evaluate_sft_clean" in (run / "report.md").read_text()
