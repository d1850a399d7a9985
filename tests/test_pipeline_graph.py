"""The stage graph: order, wiring of models and parrots, and keys that invalidate what follows."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sande_dist.config import load_config
from sande_dist.errors import InputError
from sande_dist.pipeline.graph import build_plan

ROOT = Path(__file__).resolve().parents[1]


def plan(*overrides, only=None):
    return {p.name: p for p in build_plan(load_config(None, list(overrides)), "R", only)}


def test_default_graph_wiring():
    p = plan()
    names = list(p)
    assert names.index("inject") < names.index("simulate") < names.index("eliminate") < names.index("evaluate_sande")
    assert names.index("osft") < names.index("evaluate_osft")
    assert "generate" not in p  # gold targets need no generation
    assert p["osft"].args[:2] == ["--model", "R/inject/model"]
    assert p["eliminate"].args[p["eliminate"].args.index("--parrot") + 1] == "R/simulate/parrot.safetensors"
    assert p["evaluate_sande"].args[1] == "R/eliminate/model"
    assert p["evaluate_backdoored"].deps == ["inject", "simulate"]
    assert p["inject"].distributed and not p["evaluate_osft"].distributed


def test_self_targets_add_generate_before_training():
    p = plan("removal.targets=self")
    assert "generate" in p["osft"].deps and "generate" in p["eliminate"].deps


def test_rounds_resimulate_on_the_updated_model():
    p = plan("removal.rounds=3")
    assert p["simulate_r2"].args[:2] == ["--model", "R/eliminate/model"]
    assert p["eliminate_r3"].args[:2] == ["--model", "R/eliminate_r2/model"]
    assert p["evaluate_sande"].args[1] == "R/eliminate_r3/model"


def test_later_rounds_search_where_resimulate_positions_says(tmp_path):
    from sande_dist.cli import build_parser, config_of

    p = plan("removal.rounds=4", "removal.resimulate_positions=[random, suffix]")
    config = tmp_path / "c.yaml"
    config.write_text("removal:\n  rounds: 4\n")

    def position(name):
        return config_of(build_parser().parse_args(p[name].argv(str(config), "R"))).removal.insert_position
    # round 1 (and with it the evaluations' parrot) stays at insert_position; the last entry repeats
    assert [position(n) for n in ("simulate", "eliminate")] == ["prefix"] * 2
    assert [position(n) for n in ("simulate_r2", "eliminate_r2")] == ["random"] * 2
    assert [position(n) for n in ("simulate_r3", "eliminate_r3", "simulate_r4", "eliminate_r4")] == ["suffix"] * 4
    assert "--set" not in p["evaluate_sande"].args
    assert not any(a.startswith("removal.insert_position") for a in p["simulate"].args)
    same = plan("removal.rounds=2", "removal.resimulate_positions=[prefix]")
    # no override where nothing changes
    assert not any(a.startswith("removal.insert_position") for a in same["simulate_r2"].args)
    assert same["simulate_r2"].key != p["simulate_r2"].key


def test_only_the_searches_a_decision_reads_check_their_parrot(tmp_path):
    """The held-out check (removal.search_check_rows) costs a forward pass over its rows: fixed rounds
    decide nothing, so their searches skip it; with rounds: auto every later round's search decides."""
    skip = "removal.search_check_rows=0"
    fixed = plan("removal.rounds=2", "removal.extra_parrots=[random]")
    assert all(skip in fixed[n].args for n in ("simulate", "simulate_p1", "simulate_r2", "simulate_r2_p1"))
    from sande_dist.config import load_config
    from sande_dist.pipeline.graph import build_graph

    plans, record = build_graph(load_config(overrides=["removal.rounds=auto", "removal.extra_parrots=[random]"]),
                                str(tmp_path / "run"))
    by = {p.name: p for p in plans}
    # a deciding search runs removal.search_restarts (3) parrots per position, each from its own seed
    deciding = [f"{n}{s}" for n in ("simulate_r2", "simulate_r2_p1") for s in ("", "_s2", "_s3")]
    assert record["pending"] == deciding
    assert all(skip in by[n].args for n in ("simulate", "simulate_p1"))
    assert not any(f"{n}_s2" in by for n in ("simulate", "simulate_p1"))  # round 1 decides nothing: one each
    for name in ("simulate_r2_p1", "control"):
        seeds = [next((a for a in by[n].args if a.startswith("training.seed=")), None)
                 for n in (name, f"{name}_s2", f"{name}_s3")]
        assert seeds == [None, "training.seed=43", "training.seed=44"], seeds  # training.seed is 42
        assert len({by[n].key for n in (name, f"{name}_s2", f"{name}_s3")}) == 3
    assert not any(skip in by[n].args for n in (*deciding, "control", "control_p1", "control_s3"))


def test_extra_parrots_are_searched_each_round_and_eliminated_together(tmp_path):
    from sande_dist.cli import build_parser, config_of

    p = plan("removal.rounds=2", "removal.extra_parrots=[random, suffix]")
    config = tmp_path / "c.yaml"
    config.write_text("removal:\n  extra_parrots: [random, suffix]\n")
    for r, sim, eli, model in ((1, "simulate", "eliminate", "R/inject/model"),
                               (2, "simulate_r2", "eliminate_r2", "R/eliminate/model")):
        extras = [f"{sim}_p1", f"{sim}_p2"]
        for name, where in zip(extras, ("random", "suffix")):
            args = build_parser().parse_args(p[name].argv(str(config), "R"))
            assert args.model == model and config_of(args).removal.insert_position == where
        args = build_parser().parse_args(p[eli].argv(str(config), "R"))
        assert args.parrot == [f"R/{x}/parrot.safetensors" for x in [sim, *extras]]  # in extra_parrots' order
        assert set([sim, *extras]) <= set(p[eli].deps)
        assert config_of(args).removal.insert_position == "prefix"
    assert "eliminated=R/simulate/parrot.safetensors" in p["evaluate_sande"].args  # evaluations use the first parrot
    assert not [n for n in plan() if "_p" in n]


def test_keys_follow_config_and_dependencies():
    a, b = plan(), plan("training.eliminate.lr=0.5")
    # a stage reruns when what it reads changes, and so does everything after it
    assert a["inject"].key == b["inject"].key and a["osft"].key == b["osft"].key
    assert a["eliminate"].key != b["eliminate"].key and a["evaluate_sande"].key != b["evaluate_sande"].key
    e = plan("attack.poison_rate=0.3")
    assert all(e[n].key != a[n].key for n in a)  # inject changed: every stage descends from it
    c, d = plan("eval.num_prompts=10"), plan("eval.num_prompts=10")
    assert c["evaluate_sande"].key == d["evaluate_sande"].key
    assert plan("slurm.partition=gpu")["inject"].key == a["inject"].key  # where it runs is not what it computes


def test_a_search_on_the_same_model_keeps_its_key_when_the_scanned_model_changes(tmp_path):
    """sande scan runs its reference's searches with --model REFERENCE: scanning another model in the same
    run dir (model.path) reuses them, while the scanned model's own searches rerun."""
    from sande_dist.config import load_config
    from sande_dist.pipeline.graph import Graph, control_searches, search

    keys = []
    for scanned in ("models/one", "models/two"):
        g = Graph(load_config(overrides=[f"model.path={scanned}", "removal.extra_parrots=[random]"]), str(tmp_path))
        search(g, "scan", scanned, [])
        control_searches(g, scanned, "models/clean")
        keys.append({name: plan.key for name, plan in g.plans.items()})
    assert [n for n in keys[0] if keys[0][n] == keys[1][n]] == [n for n in keys[0] if n.startswith("control")]
    assert len(keys[0]) == 12  # (scan + control) x 2 positions x 3 restarts


def test_subset_and_errors():
    p = plan(only=["inject", "evaluate_backdoored"])
    assert list(p) == ["inject", "evaluate_backdoored"]
    assert "--parrot" not in p["evaluate_backdoored"].args
    with pytest.raises(InputError, match="nope"):
        plan(only=["nope"])
    with pytest.raises(InputError, match="needs a parrot"):
        plan(only=["eliminate"])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs an OS with CPU affinity and two cores")
def test_stage_threads_follow_the_cores_the_job_may_use_not_the_machine_s():
    # a stage's ranks share the cores of the job's affinity mask (Slurm's --cpus-per-task), one here
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from sande_dist.pipeline.runner import stage_env; print(stage_env(1)['OMP_NUM_THREADS'], "
            "stage_env(2)['OMP_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, CUDA_VISIBLE_DEVICES=""), capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"], out.stdout
