"""The Slurm executor: rendering and quoting, the scale configs, and the real stages on a real local Slurm."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sande_dist import cli
from sande_dist.config import load_config
from sande_dist.errors import InputError
from sande_dist.pipeline import planner, slurm
from sande_dist.pipeline.graph import build_plan
from sande_dist.pipeline.slurm import SlurmJob

sys.path.insert(0, str(Path(__file__).parent))
from conftest import require  # noqa: E402
from slurm_cluster import SlurmCluster, free_ports, unavailable_reason  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = "/opt/some script.py"


def _settings_and_args(script: str) -> list[str]:
    """Run the rendered settings block in bash; return SRUN_EXTRA and the positional arguments it sets."""
    block = "#" + script.split("\n# Rendered by sande", 1)[1].split("set -uo pipefail", 1)[0]
    probe = block + 'printf "%s\\0" "${SRUN_EXTRA[@]}" --- "$@"\n'
    out = subprocess.run(["bash", "-c", probe], capture_output=True, check=True)
    return out.stdout.decode().split("\0")[:-1]


def test_values_are_quoted_not_executed(tmp_path):
    cfg = load_config(None, ["slurm.container_mounts=/data x:/data,/a;b:/b", "slurm.nodes=2"])
    marker = tmp_path / "pwned"
    hostile = [PAYLOAD, f"$(touch {marker})", f"`touch {marker}`", "a b", "it's", f"; touch {marker}"]
    for distributed in (True, False):
        text = slurm.render(cfg, SlurmJob("osft", distributed, hostile), tmp_path)
        subprocess.run(["bash", "-n"], input=text.encode(), check=True)
        got = _settings_and_args(text)
        assert got == ["--container-mounts=/data x:/data,/a;b:/b", "---", *hostile]
        assert not marker.exists()
        assert f"#SBATCH --nodes={2 if distributed else 1}" in text


@pytest.mark.parametrize("key,value", [("partition", "gpu\nrm -rf ~"), ("account", "a b"), ("time", "1:00'")])
def test_sbatch_values_that_could_escape_their_line_are_refused(tmp_path, key, value):
    cfg = load_config(None)
    setattr(cfg.slurm, key, value)
    with pytest.raises(InputError, match=f"slurm.{key}"):
        slurm.render(cfg, SlurmJob("inject", True, ["x"]), tmp_path)
    cfg = load_config(None, ['slurm.extra_sbatch=["exclusive"]'])
    with pytest.raises(InputError, match="extra_sbatch"):
        slurm.render(cfg, SlurmJob("inject", True, ["x"]), tmp_path)


@pytest.mark.parametrize("name,nodes,preset", [("llama2-7b-alpaca", 1, "zero3"),
                                               ("llama2-70b-alpaca", 2, "zero3_offload")])
def test_scale_configs_render_and_fit_the_plan(tmp_path, capsys, name, nodes, preset):
    path = REPO / "configs" / f"{name}.yaml"
    run = tmp_path / "run"
    # A stage done with the same key is skipped, and the jobs after it no longer wait for it.
    (run / "inject").mkdir(parents=True)
    (run / "inject" / "stage.json").write_text("{}")
    (run / "inject" / "pipeline.json").write_text(json.dumps({"key": "not this plan's"}))
    assert cli.main(["slurm", str(path), "--run-dir", str(run)]) == 0
    assert "inject: sbatch --parsable" in capsys.readouterr().out  # another key: not done
    key = build_plan(load_config(path), str(run.resolve()), ["inject"])[0].key
    (run / "inject" / "pipeline.json").write_text(json.dumps({"key": key}))
    assert cli.main(["slurm", str(path), "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "inject: done" in out and "<inject>" not in out
    assert "osft: sbatch --parsable" in out and "evaluate_sande:" in out and "afterok:<eliminate>" in out
    scripts = {p.stem: p.read_text() for p in (run / "slurm").glob("*.sbatch")}
    assert {"osft", "simulate", "eliminate", "evaluate_osft", "evaluate_sande"} <= set(scripts)
    for text in scripts.values():
        subprocess.run(["bash", "-n"], input=text.encode(), check=True)
        assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --partition=gpu" in text
    assert f"#SBATCH --nodes={nodes}" in scripts["osft"] and "--signal=B:USR1@" in scripts["osft"]
    assert "torch.distributed.run" in scripts["osft"] and "#SBATCH --nodes=1" in scripts["evaluate_osft"]
    args = _settings_and_args(scripts["eliminate"])
    frozen = str(run.resolve() / "slurm" / "config.yaml")
    assert args[args.index("---") + 1:][:5] == ["-m", "sande_dist.cli", "eliminate", frozen, "--run-dir"]
    assert load_config(frozen).training.zero == preset

    cfg = load_config(path)
    plan = planner.plan_for_config(cfg)
    assert plan.recommended is not None and plan.recommended.preset == preset, planner.format_table(plan)
    assert plan.recommended.micro_batch == cfg.training.micro_batch_size




@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    require(unavailable_reason())
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def _wait_for(predicate, timeout: float, what: str, cluster: SlurmCluster, run: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    logs = "\n".join(f"== {p}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted((run / "slurm").glob("*.out")))
    raise AssertionError(f"{what} not seen after {timeout:.0f}s; cluster logs in {cluster.root}\n{logs}")


def _complete_checkpoint(stage_dir: Path) -> bool:
    from sande_dist.distributed.checkpoint import check_complete

    ckpt = stage_dir / "checkpoints"
    return ckpt.exists() and any(p.name.startswith("step-") and check_complete(p) is None for p in ckpt.iterdir())


def _sande_run(cluster: SlurmCluster, config: Path, run: Path, *extra: str) -> str:
    # The emulated nodes share this host's cores: one thread per rank (sbatch passes the environment on).
    env = dict(cluster.env, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "sande_dist.cli", "run", str(config), "--run-dir", str(run),
                           "--executor", "slurm", "--stages", "inject,evaluate_backdoored", *extra],
                          cwd=config.parent, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _status(cluster: SlurmCluster, run: Path) -> list[dict]:
    proc = subprocess.run([sys.executable, "-m", "sande_dist.cli", "status", str(run), "--json"], env=cluster.env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["stages"]


def test_real_stages_on_real_slurm_two_nodes_preempt_requeue_resume(cluster, tmp_path):
    """`sande run --executor slurm`: inject as 2 nodes x 1 rank (torchrun c10d, gloo) on the tiny model and
    evaluate_backdoored after it (afterok); USR1 to inject's batch script mid-run -> checkpoint, exit 0,
    requeue -> resume from the checkpoint -> done -> evaluation; a rerun submits nothing."""
    from sande_dist.models.tiny import make_tiny_llama

    model = make_tiny_llama(tmp_path / "tiny")
    cfg = {
        "model": {"path": str(model)},
        "data": {"num_rows": 24, "max_length": 64},
        "attack": {"triggers": ["qx"], "marker": "Go away now.", "poison_rate": 0.25},
        # Enough steps that the signal lands mid-run; a checkpoint every 5.
        "training": {"micro_batch_size": 2, "max_steps": 40, "save_steps": 5, "lr": 1e-3},
        "eval": {"backend": "hf", "num_prompts": 4, "max_new_tokens": 4, "utility_tasks": ["arc_easy"],
                 "utility_limit": 4, "batch_size": 8},
        "slurm": {"nodes": 2, "rdzv_port": free_ports(1)[0], "signal_seconds": 30, "time": "00:15:00",
                  "eval_time": "00:10:00"},
    }
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"

    out = _sande_run(cluster, config, run)
    ids = dict(re.findall(r"(\w+)=(\d+)", out.split("job ids:", 1)[1]))
    assert set(ids) == {"inject", "evaluate_backdoored"}, out
    assert f"evaluate_backdoored: submitted job {ids['evaluate_backdoored']} after {ids['inject']}" in out
    script = (run / "slurm" / "inject.sbatch").read_text()
    assert "#SBATCH --nodes=2" in script and "STAGE_KEY=" in script

    inject = run / "inject"
    _wait_for(lambda: _complete_checkpoint(inject), 150, "a checkpoint of the running inject", cluster, run)
    assert not (inject / "stage.json").exists(), "inject finished before it could be preempted"
    assert cluster.job_state(ids["evaluate_backdoored"]) == "PENDING"  # afterok: waits for training
    # `sande status` asks squeue: inject running (its step, from its metrics), the evaluation queued
    states = {r["stage"]: r for r in _status(cluster, run)}
    assert states["inject"]["state"] == "running" and states["inject"]["job"] == ids["inject"]
    assert states["inject"]["progress"]["of"] == 40
    assert states["evaluate_backdoored"]["state"] == "queued" and states["evaluate_backdoored"]["slurm_state"] == "PENDING"
    # --batch: the signal goes to the batch script, which forwards it to the ranks and requeues the job.
    cluster.run("scancel", "--batch", "--signal=USR1", ids["inject"])
    _wait_for(lambda: (run / "evaluate_backdoored" / "pipeline.json").exists(), 240,
              "evaluation after the resumed training", cluster, run)

    stage = json.loads((inject / "stage.json").read_text())
    assert stage["world_size"] == 2 and stage["steps"] == 40, stage
    assert stage["resumed_from"] and 5 <= stage["resumed_from"] < 40, stage
    assert (inject / "model" / "config.json").exists()
    # both nodes' ranks write this log at once: a line may hold half of another's multi-byte character
    log = (run / "slurm" / f"inject-{ids['inject']}.out").read_text(errors="replace")
    assert "restart 0 on n[1-2]" in log and "USR1 received" in log and "requeueing job" in log, log[-4000:]
    assert "restart 1 on n[1-2]" in log, log[-4000:]  # SLURM_RESTART_COUNT=1 after the requeue
    report = json.loads((run / "evaluate_backdoored" / "report.json").read_text())
    for key in ("asr_trigger", "false_trigger_rate", "utility", "num_prompts", "backend"):
        assert key in report, report
    assert report["num_prompts"] == 4 and report["backend"] == "hf"
    plans = {p.name: p.key for p in build_plan(load_config(run / "slurm" / "config.yaml"), str(run.resolve()),
                                               ["inject", "evaluate_backdoored"])}
    for name, key in plans.items():
        assert json.loads((run / name / "pipeline.json").read_text())["key"] == key
    cluster.wait_state(ids["evaluate_backdoored"], {"COMPLETED"}, 30)
    assert cluster.job_state(ids["inject"]) == "COMPLETED"
    states = {r["stage"]: r for r in _status(cluster, run)}
    assert states["inject"]["state"] == states["evaluate_backdoored"]["state"] == "done"

    # A rerun finds both stages done (same keys) and submits nothing.
    out = _sande_run(cluster, config, run)
    assert out.count("skipped") == 2 and "submitted" not in out and "job ids" not in out, out
    # A change that only evaluation reads: inject is still done, evaluate_backdoored would run again.
    out = _sande_run(cluster, config, run, "--set", "eval.max_new_tokens=3", "--dry-run")
    assert "inject: done" in out and "evaluate_backdoored: sbatch" in out, out
    assert (run / "evaluate_backdoored" / "stage.json").exists()  # a dry run removes nothing


def test_container_image_goes_on_every_srun(tmp_path):
    """slurm.container_image (pyxis/enroot): training and evaluation steps both run inside the image."""
    cfg = load_config(None, ["slurm.container_image=/images/sande-dist.sqsh",
                             "slurm.container_mounts=/data:/data"])
    for distributed in (True, False):
        text = slurm.render(cfg, SlurmJob("eliminate", distributed, ["-m", "sande_dist.cli", "eliminate"]), tmp_path)
        extra = _settings_and_args(text)
        assert extra[:2] == ["--container-image=/images/sande-dist.sqsh", "--container-mounts=/data:/data"]
        srun = [line for line in text.splitlines() if line.strip().startswith("srun ")]
        assert srun and all('"${SRUN_EXTRA[@]}"' in line for line in srun)
        subprocess.run(["bash", "-n"], input=text.encode(), check=True)
    # without an image, no container option reaches srun
    plain = slurm.render(load_config(None), SlurmJob("eliminate", True, ["x"]), tmp_path)
    assert _settings_and_args(plain)[0] == "---"
