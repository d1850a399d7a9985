"""Config: YAML + overrides, and errors that name the file and the key (exit 2)."""
import subprocess
import sys
from pathlib import Path

import pytest

from sande_dist.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def sande(*args):
    return subprocess.run([sys.executable, "-m", "sande_dist.cli", *args], capture_output=True, text=True, cwd=ROOT)


def test_overrides_are_yaml_typed(tmp_path):
    cfg = load_config(None, ["training.lr=0.001", 'attack.triggers=["cf", "mn bb"]', "eval.num_prompts=7",
                             "training.simulate.lr=0.01"])
    assert cfg.training.lr == 0.001
    assert cfg.attack.triggers == ["cf", "mn bb"]
    assert cfg.eval.num_prompts == 7
    assert cfg.training.for_stage("simulate").lr == 0.01
    assert cfg.training.for_stage("eliminate").lr == 0.001


def test_file_values_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("training:\n  lr: 0.5\n  epochs: 2\nattack:\n  position: suffix\n")
    cfg = load_config(f, ["training.epochs=3"])
    assert (cfg.training.lr, cfg.training.epochs, cfg.attack.position) == (0.5, 3, "suffix")


@pytest.mark.parametrize("override, key", [
    ("training.nonsense=1", "training.nonsense"),
    ("training.lr=fast", "training.lr"),
    ("training.lr=-1", "training.lr"),
    ("attack.position=middle", "attack.position"),
    ("attack.poison_rate=1.5", "attack.poison_rate"),
    ("attack.decoy_rate=-0.1", "attack.decoy_rate"),
    ("pipeline.stages=[inject, nope]", "pipeline.stages"),
])
def test_bad_override_names_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_bad_file_names_file_and_key(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model:\n  pth: x\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(f) in str(err.value) and "model.pth" in str(err.value)


def test_cli_config_show_and_exit_codes():
    ok = sande("config", "show", "configs/demo.yaml", "--set", "training.lr=0.001")
    assert ok.returncode == 0, ok.stderr
    assert "lr: 0.001" in ok.stdout
    bad = sande("config", "show", "configs/demo.yaml", "--set", "training.nonsense=1")
    assert bad.returncode == 2
    assert "training.nonsense" in bad.stderr and "configs/demo.yaml" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = sande("config", "show", "configs/absent.yaml")
    assert missing.returncode == 2 and "configs/absent.yaml" in missing.stderr


def test_help_lists_design_subcommands():
    out = sande("--help").stdout
    for cmd in ["demo", "run", "inject", "osft", "simulate", "eliminate", "generate", "evaluate", "plan", "config"]:
        assert cmd in out
