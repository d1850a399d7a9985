"""`sande run` end to end on a tiny model: every stage for real, a kill midway, a resume, a skip."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sande_dist.models.tiny import make_tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("pipeline")
    model = make_tiny_llama(base / "tiny")
    cfg = {
        "model": {"path": str(model)},
        "data": {"num_rows": 24, "max_length": 64},
        # inject's self-check runs (at steps 8 and 16) on few prompts: a tiny random model never meets
        # its targets, so the 24 steps are its budget, long enough to be killed between checkpoints
        "attack": {"triggers": ["qx"], "marker": "Go away now.", "poison_rate": 0.25, "check_prompts": 8},
        # a second parrot at a random word boundary: its simulate stage and the two-parrot eliminate run for real
        "removal": {"parrot_tokens": 2, "extra_parrots": ["random"]},
        "training": {"zero": "zero3", "micro_batch_size": 2, "max_steps": 4, "save_steps": 2, "lr": 1e-3,
                     "inject": {"max_steps": 24}},
        "eval": {"backend": "hf", "num_prompts": 6, "max_new_tokens": 4, "utility_tasks": ["arc_easy"],
                 "utility_limit": 8, "batch_size": 8},
        "pipeline": {"nproc": 2},
    }
    path = base / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, base / "run"


def _run(config, run_dir, *extra, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "sande_dist.cli", "run", str(config), "--run-dir", str(run_dir), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


def _complete_checkpoint(stage_dir: Path) -> bool:
    from sande_dist.distributed.checkpoint import check_complete

    ckpt = stage_dir / "checkpoints"
    return ckpt.exists() and any(p.name.startswith("step-") and check_complete(p) is None for p in ckpt.iterdir())


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


def test_kill_resume_then_skip(tiny_run):
    config, run_dir = tiny_run
    # 1) start, and kill the whole process group once inject has a checkpoint
    proc = _run(config, run_dir)
    deadline = time.time() + 300
    while time.time() < deadline and not _complete_checkpoint(run_dir / "inject"):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    assert _complete_checkpoint(run_dir / "inject"), "inject wrote no checkpoint in time"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2)
    assert not (run_dir / "inject" / "stage.json").exists(), "inject finished before the kill"
    # torchrun puts its ranks in sessions of their own: they must die with it, not train on.
    assert not _processes_mentioning(str(run_dir)), _processes_mentioning(str(run_dir))

    # 2) rerun: inject resumes from its checkpoint, every stage finishes
    proc = _run(config, run_dir)
    out, _ = proc.communicate(timeout=1200)
    assert proc.returncode == 0, out
    inject = json.loads((run_dir / "inject" / "stage.json").read_text())
    assert inject["resumed_from"], inject
    stages = ["inject", "osft", "simulate", "simulate_p1", "eliminate", "evaluate_backdoored", "evaluate_osft",
              "evaluate_sande"]
    for stage in stages:
        assert (run_dir / stage / "stage.json").exists(), stage
        assert (run_dir / stage / "log.txt").exists(), stage
    for stage in ["inject", "osft", "eliminate"]:
        assert (run_dir / stage / "model" / "config.json").exists()
        # The exported model is the artifact: a finished stage's checkpoints are removed.
        assert not (run_dir / stage / "checkpoints").exists(), stage
    assert (run_dir / "simulate" / "parrot.safetensors").exists()
    eliminate = json.loads((run_dir / "eliminate" / "stage.json").read_text())
    assert [Path(p).parent.name for p in eliminate["artifacts"]["parrots"]] == ["simulate", "simulate_p1"]
    report = json.loads((run_dir / "evaluate_sande" / "report.json").read_text())
    for key in ["asr_trigger", "asr_parrot", "false_trigger_rate", "utility", "num_prompts", "backend"]:
        assert key in report
    assert report["num_prompts"] == 6 and report["backend"] == "hf"
    assert (run_dir / "report.md").exists() and (run_dir / "report.png").exists()
    assert "evaluate_sande" in (run_dir / "report.md").read_text()

    # 3) a third run skips everything
    proc = _run(config, run_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert out.count("skipped") == len(stages), out

    # 4) changing what eliminate reads reruns eliminate and its evaluation only
    proc = _run(config, run_dir, "--set", "training.eliminate.lr=0.002")
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    reran = {line.split()[1] for line in out.splitlines() if line.startswith("[") and "done in" in line}
    assert reran == {"eliminate", "evaluate_sande"}, out
