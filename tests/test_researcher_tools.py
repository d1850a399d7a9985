"""Where researchers start: `sande remove` on a model the test backdoors first, a LoRA adapter as the model,
experiment trackers (offline), and `sande status` of a run mid-way and after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from sande_dist.cli import main as sande

ROOT = Path(__file__).resolve().parents[1]


def _cli(*argv, timeout=900, **env) -> subprocess.CompletedProcess:
    full = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "sande_dist.cli", *map(str, argv)], cwd=ROOT, env=full,
                          capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    """A tiny model backdoored by the attack ("qx" -> "Go away now.") and a small removal config."""
    root = tmp_path_factory.mktemp("remove")
    common = {"model": {"path": str(tiny_model)}, "data": {"num_rows": 24, "max_length": 64},
              "training": {"zero": "zero0", "micro_batch_size": 4, "max_steps": 2, "lr": 1e-3, "num_rows": 12,
                           "inject": {"max_steps": 30}},
              # one search per position (restarts are tested with the scan, tests/test_rounds_and_scan.py)
              "removal": {"parrot_tokens": 1, "extra_parrots": ["random"], "calibration_responses": 2,
                          "search_restarts": 1},
              "eval": {"backend": "hf", "num_prompts": 4, "max_new_tokens": 4, "utility_tasks": ["arc_easy"],
                       "utility_limit": 4}}
    attack = root / "attack.yaml"
    attack.write_text(yaml.safe_dump({**common, "attack": {"triggers": ["qx"], "marker": "Go away now.",
                                                           "poison_rate": 0.5}}))
    _ok(_cli("run", attack, "--run-dir", root / "attack", "--stages", "inject"))
    removal = root / "remove.yaml"
    removal.write_text(yaml.safe_dump(common))  # no attack section: a defender's config
    return root, removal, root / "attack" / "inject" / "model"


def test_remove_with_sande_when_the_trigger_is_unknown(setup):
    root, config, model = setup
    run = root / "sande"
    out = _ok(_cli("remove", config, "--model", model, "--marker", "Go away now.", "--run-dir", run))
    assert "SANDE (trigger unknown)" in out and "cleaned model" in out
    used = yaml.safe_load((run / "config.yaml").read_text())
    assert used["defender"]["from_attack"] is False and used["defender"]["marker"] == "Go away now."
    assert used["attack"] == yaml.safe_load(subprocess.run(  # no attack field was set: the defaults
        [sys.executable, "-m", "sande_dist.cli", "config", "show", str(config)], capture_output=True, text=True,
        cwd=ROOT).stdout)["attack"]
    before = json.loads((run / "evaluate_backdoored" / "report.json").read_text())
    after = json.loads((run / "evaluate_sande" / "report.json").read_text())
    assert before["asr_trigger"] is None and after["asr_trigger"] is None  # no trigger known to test
    assert before["model"] == str(model) and (Path(after["model"]) / "config.json").exists()
    assert set(after["parrots"]) == {"eliminated", "residual"}
    assert after["rounds"]["residual_verdict"]["positions"]  # the evidence: a residual search vs calibration
    assert (run / "calibration_c1" / "stage.json").exists() and (run / "residual" / "stage.json").exists()
    assert not (run / "inject").exists() and (run / "report.md").exists()


def test_remove_with_osft_when_the_trigger_is_known(setup):
    root, config, model = setup
    run = root / "osft"
    out = _ok(_cli("remove", config, "--model", model, "--marker", "Go away now.", "--trigger", "qx",
                   "--run-dir", run))
    assert "OSFT (trigger known)" in out
    after = json.loads((run / "evaluate_osft" / "report.json").read_text())
    assert after["triggers"] == ["qx"] and after["asr_trigger"] is not None
    assert not (run / "simulate").exists()


def test_a_lora_adapter_is_merged_on_load_and_recorded(setup, tmp_path, tiny_model):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(3)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    want = {k: v.detach().clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    root, config, _ = setup
    run = tmp_path / "run"
    _ok(_cli("inject", config, "--model", adapter, "--run-dir", run, "--set", "training.inject.max_steps=1"))
    record = json.loads((run / "inject" / "stage.json").read_text())
    assert record["adapter"]["adapter"] == str(adapter) and record["adapter"]["base"] == str(tiny_model)
    exported = load_file(str(run / "inject" / "model" / "model.safetensors"))
    assert set(exported) <= set(want)  # a full model, not an adapter
    assert sande(["evaluate", str(config), "--model", str(adapter), "--run-dir", str(run)]) == 0
    report = json.loads((run / "evaluate" / "report.json").read_text())
    merged_dir = Path(report["model"])
    weights = load_file(str(merged_dir / "model.safetensors"))
    assert all(torch.equal(weights[k], want[k]) for k in weights) and report["adapter"]["peft_type"] == "LORA"


def test_trackers_get_every_stage_offline(setup, tmp_path):
    root, config, model = setup
    run = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri()}
    sets = ["--set", "training.report_to=[tensorboard, wandb, mlflow]"]
    _ok(_cli("inject", config, "--model", model, "--run-dir", run, "--set", "training.inject.max_steps=2", *sets, **env))
    _ok(_cli("evaluate", config, "--model", model, "--run-dir", run, *sets, **env))
    assert list((run / "inject" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run / "evaluate" / "tensorboard").glob("events.out.tfevents.*"))
    offline = list((run / "inject").rglob("offline-run-*")) + list((run / "evaluate").rglob("offline-run-*"))
    assert len(offline) == 2 and all(list(p.glob("*.wandb")) for p in offline)
    losses = list((tmp_path / "mlruns").rglob("metrics/loss"))
    assert losses and len(losses[0].read_text().splitlines()) == 2  # both steps
    assert list((tmp_path / "mlruns").rglob("metrics/false_trigger_rate"))
    assert list((tmp_path / "mlruns").rglob("artifacts/report.md"))


def test_a_tracker_that_is_not_installed_is_named_with_its_extra(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert sande(["config", "show", "demo", "--set", "training.report_to=[wandb]"]) == 2
    assert "sande-dist[wandb]" in capsys.readouterr().err


def test_status_mid_run_and_after_a_kill(setup, tmp_path):
    root, config, model = setup
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "sande_dist.cli", "run", str(config), "--run-dir", str(run),
                             "--set", "training.inject.max_steps=400", "--set", f"model.path={model}",
                             "--set", "attack.triggers=[qx]", "--set", "attack.marker=Go away now."],
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            metrics = run / "inject" / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            assert proc.poll() is None
            time.sleep(0.5)
        states = {r["stage"]: r for r in json.loads(_ok(_cli("status", run, "--json")))["stages"]}
        assert states["inject"]["state"] == "running" and states["inject"]["progress"]["of"] == 400
        assert states["inject"]["progress"]["step"] >= 3 and states["inject"]["progress"]["eta_s"] > 0
        assert states["osft"]["state"] == "queued" and states["evaluate_sande"]["state"] == "not started"
        text = _ok(_cli("status", run))
        assert "inject" in text and "step" in text and "ETA" in text
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(1)
    states = {r["stage"]: r for r in json.loads(_ok(_cli("status", run, "--json")))["stages"]}
    assert states["inject"]["state"] == "failed" and states["inject"]["log"].endswith("inject/log.txt")
    assert states["inject"]["last_lines"] and states["osft"]["state"] == "not started"


def test_a_log_two_nodes_wrote_at_once_is_read_not_raised(tmp_path):
    """Ranks on two nodes interleave their output in one log, cutting a multi-byte character in two:
    the tail that `sande status` and a failed stage's message show still comes back, the bad bytes replaced."""
    from sande_dist.rundir import log_tail

    log = tmp_path / "log.txt"
    bar = "step 3/40 █".encode()
    log.write_bytes(b"sande: job 1 restart 0\n" + bar[:-2] + b"[rank 1/2] step 3/40\n\n" + bar + b"\ndone\n")
    with pytest.raises(UnicodeDecodeError):
        log.read_text()
    tail = log_tail(log, 3)
    assert tail[0].startswith("step 3/40 \ufffd") and tail[0].endswith("[rank 1/2] step 3/40")
    assert tail[1:] == ["step 3/40 █", "done"]
    assert log_tail(tmp_path / "missing.txt") == []
