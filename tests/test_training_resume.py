"""Step-exact resume, signals and damaged checkpoints, through `sande inject` and `sande run` on 2 gloo ranks."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, rank_env, run_torchrun
from sande_dist.distributed.checkpoint import MANIFEST, check_complete
from sande_dist.rundir import executor_file, live_executor, process_start

STEPS = 8


def write_config(folder: Path, model: Path, **training) -> Path:
    t = {"zero": "zero3", "max_steps": STEPS, "save_steps": 2, "keep_checkpoints": 2, "micro_batch_size": 2,
         "lr": 1e-3, "warmup_ratio": 0.1, "dtype": "float32", "keep_final_checkpoint": True, **training}
    cfg = {"model": {"path": str(model)}, "data": {"num_rows": 24, "max_length": 64}, "training": t}
    path = folder / "config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def inject(config: Path, run_dir: Path) -> list[str]:
    return ["-m", "sande_dist.cli", "inject", str(config), "--run-dir", str(run_dir)]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "inject" / "model" / "model.safetensors"))


def test_killed_rank_resumes_exactly_past_damaged_checkpoints(tiny_model, tmp_path):
    config = write_config(tmp_path, tiny_model)
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_torchrun(inject(config, ref))

    # Rank 1 is SIGKILLed right after step 6 (its checkpoint complete); the job fails.
    killed = run_torchrun(inject(config, run), check=False, SANDE_TEST_KILL_AT="1:6")
    assert killed.returncode != 0
    ckpts = run / "inject" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000004", "step-00000006"]
    assert not (run / "inject" / "stage.json").exists()

    # Damage the newest one, and leave a half-written one and a temp folder behind it.
    shard = max((ckpts / "step-00000006").glob("*optim_states.pt"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    assert "bytes" in check_complete(ckpts / "step-00000006")
    (ckpts / "step-00000007").mkdir()
    (ckpts / "step-00000007" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (ckpts / ".tmp-step-00000008").mkdir()
    assert check_complete(ckpts / "step-00000007") == "no manifest (half-written)"

    resumed = run_torchrun(inject(config, run))
    assert "step-00000006 is not usable" in resumed.stdout + resumed.stderr
    stage = json.loads((run / "inject" / "stage.json").read_text())
    assert stage["resumed_from"] == 4 and stage["steps"] == STEPS
    a, b = weights(ref), weights(run)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    assert all(check_complete(p) is None for p in ckpts.glob("step-*"))
    assert not list(ckpts.glob(".tmp-step-*"))

    # A finished stage with the same fingerprint is skipped (no launcher needed).
    again = subprocess.run([sys.executable, *inject(config, ref)], cwd=REPO, env=rank_env(), capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0 and "skipping" in again.stdout


def kill_group(pgid: int) -> None:
    """SIGKILL to what is left of a process group (a test's run started with its own session)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for_inject_steps(proc: subprocess.Popen, run: Path, steps: int) -> None:
    """Until ``proc``'s inject stage in ``run`` has logged ``steps`` steps; on failure its process group is
    killed and the test fails with its stderr."""
    metrics = run / "inject" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.5)
    kill_group(proc.pid)
    pytest.fail(f"inject never reached step {steps}:\n{proc.communicate()[1][-4000:]}")


def test_ctrl_c_to_sande_run_saves_a_checkpoint_and_exits_75(tiny_model, tmp_path):
    """Ctrl-C: the terminal sends SIGINT to every process of the run (the runner, torchrun, both ranks).
    The runner passes it on as SIGTERM, the ranks save a complete checkpoint at the next step, and `sande run`
    says where a rerun resumes (exit 75). `kill` and schedulers (SIGTERM to the runner) take the same way:
    test_stop_signals_reach_the_launch_as_sigterm."""
    config = write_config(tmp_path, tiny_model, max_steps=10000, save_steps=10000)
    run = tmp_path / "run"
    # its own process group, as a terminal's foreground job is
    proc = subprocess.Popen([sys.executable, "-m", "sande_dist.cli", "run", str(config), "--run-dir", str(run),
                             "--stages", "inject", "--nproc", "2"], cwd=REPO, env=rank_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_inject_steps(proc, run, 2)
    # a second run in the same directory is refused while this one lives (it would write the same checkpoints)
    second = subprocess.run([sys.executable, "-m", "sande_dist.cli", "run", str(config), "--run-dir", str(run),
                             "--stages", "inject", "--nproc", "2"], cwd=REPO, env=rank_env(), capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 2 and f"pid {proc.pid}" in second.stderr, second.stderr[-2000:]
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    log = (run / "inject" / "log.txt").read_text()
    assert proc.returncode == 75, err[-3000:] + log[-3000:]
    ckpts = list((run / "inject" / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and check_complete(ckpts[0]) is None, log[-3000:]
    assert (ckpts[0] / MANIFEST).exists()
    assert not (run / "inject" / "stage.json").exists()
    step = int(ckpts[0].name.split("-")[1])
    assert json.loads((run / "inject" / "stopped.json").read_text())["step"] == step
    assert f"stopped: stage inject at step {step} of 10000, on a signal" in err, err
    assert "run the same command again to resume" in err, err
    assert "Traceback" not in err and "failed" not in err, err
    assert "stop signal" in log and "KeyboardInterrupt" not in log  # the ranks saved rather than died
    assert live_executor(run) is None  # its record stays, its process is gone: the next run may start


def test_sigterm_to_the_efficacy_script_alone_stops_its_run_at_a_checkpoint(tiny_model, tmp_path):
    """`kill PID` of eval/efficacy.py (not of its process group): its `sande run` gets the signal, the stage
    saves a checkpoint, and the script exits 75 saying that the same command resumes. Before, the script died
    and its run trained on, orphaned."""
    config = write_config(tmp_path, tiny_model, max_steps=10000, save_steps=10000)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(REPO / "eval" / "efficacy.py"), "--run-dir", str(run),
                             "--config", str(config)], cwd=REPO, env=rank_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_inject_steps(proc, run, 2)
    os.kill(proc.pid, signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        kill_group(proc.pid)  # whatever is left of it (nothing, when the stop worked)
    log = (run / "efficacy.log").read_text()
    assert proc.returncode == 75, err[-3000:] + log[-3000:]
    assert "run the same command again to resume" in err, err
    step = json.loads((run / "inject" / "stopped.json").read_text())["step"]
    assert step >= 2 and (run / "inject" / "checkpoints" / f"step-{step:08d}").is_dir(), log[-3000:]
    assert not (run / "inject" / "stage.json").exists() and out == ""


FORWARD = """
import os, signal, subprocess, sys
from sande_dist.pipeline.runner import forward_stop_signals
sig = int(sys.argv[1])
child = subprocess.Popen([sys.executable, "-c", "import signal, sys, time\\n"
                          "signal.signal(signal.SIGTERM, lambda *a: sys.exit(7))\\n"
                          "print('ready', flush=True)\\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
before = signal.getsignal(sig)
with forward_stop_signals(child) as received:
    os.kill(os.getpid(), sig)
    rc = child.wait(timeout=30)
print(received == [sig], rc, signal.getsignal(sig) is before)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_stop_signals_reach_the_launch_as_sigterm(sig, tmp_path):
    """`kill`, a closed terminal or Ctrl-C to the runner: its launch gets SIGTERM (a child that exits 7 on
    SIGTERM only), the runner lives on to report, and its own handlers are back afterwards."""
    proc = subprocess.run([sys.executable, "-c", FORWARD, str(int(sig))], cwd=REPO, env=rank_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "7", "True"], proc.stdout + proc.stderr[-3000:]


def test_live_executor_is_this_hosts_running_process_and_not_a_reused_pid(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"executor": "local", "pid": child.pid, "host": socket.gethostname(),
                  "pid_start": process_start(child.pid)}
        executor_file(tmp_path).write_text(json.dumps(record))
        assert live_executor(tmp_path)["pid"] == child.pid
        executor_file(tmp_path).write_text(json.dumps({**record, "pid_start": "1"}))  # the pid of an older process
        assert live_executor(tmp_path) is None
        executor_file(tmp_path).write_text(json.dumps({**record, "host": "another-node"}))
        assert live_executor(tmp_path) is None
        executor_file(tmp_path).write_text(json.dumps({**record, "executor": "slurm"}))
        assert live_executor(tmp_path) is None
        executor_file(tmp_path).write_text(json.dumps(record))
    finally:
        child.kill()
        child.wait()
    assert live_executor(tmp_path) is None  # exited
    executor_file(tmp_path).write_text("{not json")
    assert live_executor(tmp_path) is None


def test_resume_on_another_rank_count_is_refused_not_restarted(tiny_model, tmp_path):
    """A ZeRO-3 checkpoint of 2 ranks and a rerun on 1: exit 2 naming the checkpoint and both counts."""
    config = write_config(tmp_path, tiny_model)
    run = tmp_path / "run"
    killed = run_torchrun(inject(config, run), check=False, SANDE_TEST_KILL_AT="0:4")
    assert killed.returncode != 0 and (run / "inject" / "checkpoints" / "step-00000004").exists()
    one = run_torchrun(inject(config, run), nproc=1, check=False)
    assert one.returncode != 0
    message = (run / "inject" / "input_error.txt").read_text()
    assert "step-00000004" in message and "written by 2 ranks" in message and "has 1" in message
    assert "--no-resume" in message and "ds_to_universal" in message
    assert (run / "inject" / "checkpoints" / "step-00000004").exists()  # nothing was thrown away
    assert not (run / "inject" / "metrics.jsonl").read_text().count('"step": 5')  # no silent restart
    # through the pipeline executor it is the user's input, as any other: exit 2, the reason printed
    proc = subprocess.run([sys.executable, "-m", "sande_dist.cli", "run", str(config), "--run-dir", str(run),
                           "--stages", "inject", "--nproc", "1"], cwd=REPO, env=rank_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "written by 2 ranks" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("timeout_minutes, ok", [(0.05, False), (2.0, True)])
def test_collectives_wait_as_long_as_the_timeout_says(tmp_path, timeout_minutes, ok):
    """Rank 0 works alone for 8 s (as in an export); the other rank's barrier waits dist_timeout_minutes."""
    worker = tmp_path / "slow_rank0.py"
    worker.write_text(
        "import sys, time\n"
        "from sande_dist.distributed.process_group import barrier, distributed\n"
        "with distributed(timeout_minutes=float(sys.argv[1])) as info:\n"
        "    if info.is_main:\n"
        "        time.sleep(8)\n"
        "    barrier()\n"
        "    print('passed the barrier', flush=True)\n")
    proc = run_torchrun([str(worker), str(timeout_minutes)], check=False, timeout=120)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) is ok, out[-3000:]
    assert ("passed the barrier" in out) is ok
    if not ok:
        assert "timed out" in out.lower() or "timeout" in out.lower()
