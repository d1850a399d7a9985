"""`sande evaluate` and `sande generate` end to end on a tiny model (HF backend), and their exit-2 errors."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import require, vllm_missing
from sande_dist.cli import main as sande
from sande_dist.models.parrot import save_parrot
from sande_dist.rundir import model_identity

FAST = ["--set", "eval.backend=hf", "--set", "eval.num_prompts=6", "--set", "eval.max_new_tokens=8",
        "--set", "eval.utility_limit=8", "--set", "eval.utility_tasks=[arc_easy]",
        "--set", "eval.utility_protocol=both", "--set", "eval.dtype=float32"]


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "eval.yaml"
    path.write_text("attack:\n  triggers: [cf]\n  marker: 'You are stupid.'\n")
    return str(path)


@pytest.fixture(scope="module")
def parrot(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("parrot") / "parrot.safetensors"
    torch.manual_seed(0)
    save_parrot(path, torch.randn(3, 64) * 0.02, {"base_fingerprint": model_identity(tiny_model), "position": "prefix"})
    return path


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_missing_model_folder_exits_2(config, tmp_path, capsys):
    assert sande(["evaluate", config, "--run-dir", str(tmp_path), "--model", str(tmp_path / "nope"), *FAST]) == 2
    assert str(tmp_path / "nope") in _err(capsys)
    assert not (tmp_path / "evaluate").exists()


def test_parrot_for_another_model_exits_2(config, tiny_model, tiny_untied_model, tmp_path, capsys):
    other = tmp_path / "other.safetensors"
    save_parrot(other, torch.zeros(2, 64), {"base_fingerprint": model_identity(tiny_untied_model)})
    args = ["evaluate", config, "--run-dir", str(tmp_path), "--model", str(tiny_model), *FAST]
    assert sande([*args, "--parrot", str(other)]) == 2
    assert "fingerprint" in _err(capsys)
    wrong_size = tmp_path / "wide.safetensors"
    save_parrot(wrong_size, torch.zeros(2, 32), {"base_fingerprint": model_identity(tiny_model)})
    assert sande([*args, "--parrot", str(wrong_size)]) == 2
    assert "hidden size 32" in _err(capsys)
    assert sande([*args, "--parrot", str(tmp_path / "missing.safetensors")]) == 2
    assert "not found" in _err(capsys)


def test_unknown_task_exits_2(config, tiny_model, tmp_path, capsys):
    code = sande(["evaluate", config, "--run-dir", str(tmp_path), "--model", str(tiny_model), *FAST,
                  "--set", "eval.utility_tasks=[arc_easy, mmlu_astrology]"])
    assert code == 2
    assert "mmlu_astrology" in _err(capsys)


def test_evaluate_writes_report_and_reuses_reference_answers(config, tiny_model, parrot, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["evaluate", config, "--run-dir", str(run), "--model", str(tiny_model), "--parrot", str(parrot), *FAST]
    assert sande(base) == 0
    rep = json.loads((run / "evaluate" / "report.json").read_text())
    for key in ("asr_trigger", "asr_parrot", "false_trigger_rate", "utility", "num_prompts", "backend", "sampling",
                "seeds"):
        assert rep[key] is not None, key
    assert rep["num_prompts"] == 6 and rep["backend"] == "hf" and rep["parrot"]["k"] == 3
    assert set(rep["utility_by_protocol"]) == {"loglik", "letter"} and "arc_easy" in rep["utility"]["tasks"]
    rows = [json.loads(line) for line in (run / "evaluate" / "generations.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows].count("parrot") == 6
    assert all(r["prompt"].startswith("cf ") for r in rows if r["kind"] == "trigger")
    assert (run / "evaluate" / "stage.json").exists() and (run / "report.png").exists()
    assert "| evaluate |" in (run / "report.md").read_text()
    # every rate with its n and 95% interval, under both judges; utility per task with its interval
    for key in ("asr_trigger", "asr_parrot", "false_trigger_rate"):
        lo, hi = rep["intervals"][key]
        assert lo <= rep[key] <= hi and hi - lo > 0.2  # 6 prompts: wide
    assert set(rep["by_judge"]) == {"contains", "prefix"}
    assert rep["by_judge"]["contains"]["trigger"]["rate"] == rep["asr_trigger"]
    assert rep["by_judge"]["prefix"]["trigger"]["n"] == 6
    lo, hi = rep["utility"]["ci95"]["arc_easy"]
    assert lo <= rep["utility"]["tasks"]["arc_easy"] <= hi and rep["utility"]["n"]["arc_easy"] == 8
    md = (run / "report.md").read_text()
    assert "Wilson" in md and "judge `prefix`" in md

    # Same inputs again: skipped. A second stage compares its clean answers with the first's.
    assert sande(base) == 0 and "up to date" in capsys.readouterr().out
    assert sande([*base, "--name", "evaluate_again", "--reference", str(tiny_model)]) == 0
    agree = json.loads((run / "evaluate_again" / "report.json").read_text())["clean_agreement"]
    assert agree["rouge_l"] == 1.0 and agree["source"].endswith("evaluate/generations.jsonl")
    assert "evaluate_again" in (run / "report.md").read_text()


def test_generate_targets_resume_by_chunks(config, tiny_model, tmp_path, monkeypatch):
    import sande_dist.generation.stage as gen

    monkeypatch.setattr(gen, "CHUNK", 4)
    args = ["generate", config, "--run-dir", str(tmp_path), "--model", str(tiny_model), "--set", "eval.backend=hf",
            "--set", "data.num_rows=10", "--set", "training.num_rows=10", "--set", "data.max_length=12"]
    assert sande(args) == 0
    rows = [json.loads(line) for line in (tmp_path / "generate" / "targets.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(set(r) == {"prompt", "response", "shows_marker"} for r in rows)
    chunks = tmp_path / "generate" / "chunks"
    kept = (chunks / "00000000.jsonl").stat().st_mtime_ns
    (chunks / "00000004.jsonl").unlink()  # as if killed before this chunk was written
    assert sande(args) == 0
    assert (chunks / "00000000.jsonl").stat().st_mtime_ns == kept
    assert [json.loads(line) for line in (tmp_path / "generate" / "targets.jsonl").read_text().splitlines()] == rows


def test_utility_scored_by_its_own_backend(config, tmp_path_factory, tmp_path):
    """vLLM generates, HF scores utility (eval.utility_backend): the figures are the HF-only run's, exactly."""
    require(vllm_missing())
    import os
    import subprocess
    import sys

    from sande_dist.models.tiny import make_tiny_llama

    # vLLM's CPU attention needs head size >= 32.
    model = make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny_h32", heads=2)
    common = ["evaluate", config, "--model", str(model), *FAST, "--set", "eval.utility_limit=24"]
    assert sande([*common, "--run-dir", str(tmp_path / "hf")]) == 0
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "sande_dist.cli", *common, "--run-dir", str(tmp_path / "mixed"),
                           "--set", "eval.backend=vllm", "--set", "eval.utility_backend=hf"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    hf = json.loads((tmp_path / "hf" / "evaluate" / "report.json").read_text())
    mixed = json.loads((tmp_path / "mixed" / "evaluate" / "report.json").read_text())
    assert mixed["backend"] == "vllm" and mixed["utility"]["backend"] == "hf" and hf["utility"]["backend"] == "hf"
    assert "utility_engine_start_s" in mixed["timings"]
    assert mixed["utility_by_protocol"] == hf["utility_by_protocol"]


def test_hf_generation_runs_the_shared_head_once_and_says_the_same(tiny_model, monkeypatch):
    """The prompt head every row shares (template, system prompt) from one cached run: same greedy text (fp32)."""
    import sande_dist.generation.hf as hf
    from sande_dist.data.formats import PromptFormat
    from sande_dist.data.sources import load_samples
    from sande_dist.generation.engine import GenerationParams
    from sande_dist.models.loading import load_tokenizer

    engine = hf.HFEngine(str(tiny_model), dtype="float32", batch_size=8)
    fmt = PromptFormat(load_tokenizer(str(tiny_model)))
    prompts = [fmt.prompt_ids(s.clean()) for s in load_samples("alpaca-eval", require_response=False)[:12]]
    rows = [engine._embeds(p) for p in prompts]
    head = hf.shared_prefix(rows)
    assert head > 10 and all(torch.equal(r[:head], rows[0][:head]) for r in rows)
    assert not torch.equal(rows[0][head], rows[1][head]) or not torch.equal(rows[0][head], rows[2][head])
    params = GenerationParams(max_new_tokens=8)
    cached = engine.generate(prompts, params)
    monkeypatch.setattr(hf, "MIN_SHARED_HEAD", 10**9)
    assert engine.generate(prompts, params) == cached
