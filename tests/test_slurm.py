"""The Slurm executor: rendering and quoting, the scale configs, and a real local Slurm cluster."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sande_dist import cli
from sande_dist.config import load_config
from sande_dist.errors import InputError
from sande_dist.pipeline import planner, slurm
from sande_dist.pipeline.slurm import SlurmJob

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import SlurmCluster, free_ports, unavailable_reason  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = str(Path(__file__).with_name("slurm_payload.py"))


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
    # A stage already done is skipped, and the jobs after it no longer wait for it.
    (run / "inject").mkdir(parents=True)
    (run / "inject" / "stage.json").write_text("{}")
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
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def _wait_for(predicate, timeout: float, what: str, cluster: SlurmCluster, run: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((run / "slurm").glob("*.out")))
    raise AssertionError(f"{what} not seen after {timeout:.0f}s; cluster logs in {cluster.root}\n{logs}")


def test_real_slurm_two_nodes_dependency_preemption_requeue(cluster, tmp_path, monkeypatch, capsys):
    """2 nodes x 1 rank under torchrun c10d; USR1 -> checkpoint -> requeue -> resume; eval runs after."""
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    cfg = load_config(None, ["slurm.nodes=2", f"slurm.rdzv_port={free_ports(1)[0]}", "slurm.signal_seconds=30",
                             "slurm.time=00:10:00", "slurm.eval_time=00:05:00"])
    run = tmp_path / "run"
    jobs = [SlurmJob("train", True, [PAYLOAD, "train", "--run-dir", str(run), "--stage", "train",
                                     "--until-preempted"]),
            SlurmJob("evaluate", False, [PAYLOAD, "eval", "--run-dir", str(run), "--stage", "evaluate"], ["train"])]
    ids = slurm.submit_jobs(cfg, jobs, run)
    assert set(ids) == {"train", "evaluate"}
    # Submitting again while the jobs are queued reuses them.
    assert slurm.submit_jobs(cfg, jobs, run) == ids
    assert "already queued as job" in capsys.readouterr().out

    progress = run / "train" / "progress"
    _wait_for(lambda: progress.exists() and int(progress.read_text()) >= 2, 90, "training progress", cluster, run)
    assert cluster.job_state(ids["evaluate"]) == "PENDING"  # afterok: waits for training
    # --batch: the signal goes to the batch script, which forwards it to the ranks and requeues.
    cluster.run("scancel", "--batch", "--signal=USR1", ids["train"])
    _wait_for(lambda: (run / "evaluate" / "stage.json").exists(), 150, "evaluation after the resumed training",
              cluster, run)

    attempts = [json.loads(line) for line in (run / "train" / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2
    first, second = attempts
    assert first["world_size"] == 2 and first["allreduce"] == 3.0 and sorted(first["nodes"]) == ["n1", "n2"]
    checkpoint = json.loads((run / "train" / "checkpoint.json").read_text())["step"]
    assert first["restart_count"] == 0 and second["restart_count"] == 1
    assert second["resumed_from"] == checkpoint >= 2
    trained = json.loads((run / "train" / "stage.json").read_text())
    assert trained["resumed_from"] == checkpoint and trained["steps"] > checkpoint
    assert json.loads((run / "evaluate" / "stage.json").read_text())["trained"] == trained
    log = (run / "slurm" / f"train-{ids['train']}.out").read_text()
    assert "requeueing job" in log and "restart 1" in log
    cluster.wait_state(ids["evaluate"], {"COMPLETED"}, 30)

    # A rerun finds both stages done and submits nothing.
    assert slurm.submit_jobs(cfg, jobs, run) == {}
    assert capsys.readouterr().out.count("skipped") == 2
