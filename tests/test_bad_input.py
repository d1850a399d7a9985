"""Bad input ends in exit 2 and one message that names the file, line/row, key or flag: never a traceback.

Each case hands the real CLI (in this process) a broken config, data file, model folder, parrot,
DeepSpeed JSON or prompt file, the way a user would, and checks what it prints.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from sande_dist.cli import main as sande
from sande_dist.models.parrot import save_parrot
from sande_dist.rundir import model_identity


def fails(capsys, argv: list[str], *named: str) -> str:
    code = sande([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, f"exit {code} for {argv}:\n{err}"
    assert "Traceback" not in err, err
    for text in named:
        assert str(text) in err, f"{text!r} not in: {err}"
    return err


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# --- configs and --set --------------------------------------------------------------------------

@pytest.mark.parametrize("text, named", [
    ("model: [\n", "not valid YAML"),
    ("- model\n- data\n", "top level must be a mapping"),
    ("training:\n  inject:\n    lrr: 1\n", "training.inject.lrr"),
    ("eval:\n  num_prompts: many\n", "eval.num_prompts"),
    ("training:\n  zero: zero9\n", "training.zero"),
    ("removal:\n  mode: sande\n", "pipeline.stages"),
    ("pipeline:\n  stages: [inject, clean_it]\n", "clean_it"),
])
def test_bad_config_files(capsys, tmp_path, text, named):
    path = write(tmp_path / "bad.yaml", text)
    fails(capsys, ["config", "show", path], path, named)


def test_binary_and_missing_configs(capsys, tmp_path):
    garbage = write(tmp_path / "garbage.yaml", b"\xff\xfe\x00\x81model")
    fails(capsys, ["config", "show", garbage], garbage)
    fails(capsys, ["config", "show", tmp_path / "absent.yaml"], "absent.yaml", "demo")  # shipped ones listed
    fails(capsys, ["config", "show", tmp_path], tmp_path)


@pytest.mark.parametrize("content, named", [
    ("{ not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"zero_optimization": {"stage": 7}}', "zero_optimization.stage"),
    (b"\xff\xd8\xff", "not valid JSON"),
])
def test_bad_deepspeed_json(capsys, tmp_path, content, named):
    path = write(tmp_path / "ds.json", content)
    fails(capsys, ["config", "show", "demo", "--set", f"training.zero={path}"], "training.zero", path, named)


@pytest.mark.parametrize("override, named", [
    ("training.lr", "KEY=VALUE"),
    ("training.lr=[1,", "not valid YAML"),
    ("training..lr=1", "bad key"),
    ("attack.triggers=[]", "attack.triggers"),
    ("data.prompt_format=klingon", "data.prompt_format"),
])
def test_bad_overrides(capsys, override, named):
    fails(capsys, ["config", "show", "demo", "--set", override], named)


def test_run_dir_that_is_a_file(capsys, tmp_path):
    path = write(tmp_path / "taken", "x")
    fails(capsys, ["config", "show", "demo", "--run-dir", path], "run_dir", path)


# --- data files (checked by `sande run` before any stage starts) ---------------------------------

def _run_with_data(capsys, tiny_model, tmp_path, data: Path, *named):
    return fails(capsys, ["run", "demo", "--stages", "inject", "--run-dir", tmp_path / "run",
                          "--set", f"model.path={tiny_model}", "--set", f"data.train={data}"], data, *named)


@pytest.mark.parametrize("name, content, named", [
    ("rows.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": oops}\n',
     "line 3"),
    ("rows.jsonl", '{"instruction": "a", "output": "b"}\n[1, 2]\n', "line 2"),
    ("rows.jsonl", "", "no rows"),
    ("rows.jsonl", b'{"instruction": "caf\xe9", "output": "b"}\n', "UTF-8"),
    ("rows.json", '{"instruction": "a", "output": "b"}', "list of objects"),
    ("rows.json", '["a", "b"]', "row 0"),
    ("rows.json", '[{"instruction": "a", "output": "b"},', "not valid JSON"),
    ("rows.json", '[{"instruction": "a"}, {"instruction": "b"}]', "cannot tell the format"),
    ("rows.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c", "output": 3}]', "row 1"),
    ("rows.json", '[{"instruction": "a", "output": ""}]', "row 0"),
    ("rows.csv", "question,answer\nwhat,that\n", "cannot tell the format"),
    ("rows.parquet", b"PAR1 this is no parquet", "parquet"),
    ("rows.txt", "instruction: a\n", "unsupported data file type"),
])
def test_bad_data_files(capsys, tiny_model, tmp_path, name, content, named):
    _run_with_data(capsys, tiny_model, tmp_path, write(tmp_path / name, content), named)


def test_data_path_that_is_a_folder_or_missing(capsys, tiny_model, tmp_path):
    folder = tmp_path / "rows.json"
    folder.mkdir()
    _run_with_data(capsys, tiny_model, tmp_path, folder, "not a file")
    _run_with_data(capsys, tiny_model, tmp_path, tmp_path / "absent.jsonl", "not found")


def test_bad_eval_prompts(capsys, tiny_model, tmp_path):
    prompts = write(tmp_path / "prompts.jsonl", '{"instruction": "a"}\n{"instruction": \n')
    fails(capsys, ["run", "demo", "--stages", "inject", "--run-dir", tmp_path / "run", "--set",
                   f"model.path={tiny_model}", "--set", f"eval.prompts={prompts}"], prompts, "line 2")


# --- model folders ------------------------------------------------------------------------------

def _broken_model(tiny_model: Path, tmp_path: Path, how: str) -> Path:
    folder = Path(shutil.copytree(tiny_model, tmp_path / f"model_{how}"))
    weights = folder / "model.safetensors"
    if how == "no_weights":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "not_safetensors":
        weights.write_bytes(b"\x00" * 64)
    elif how == "bad_config":
        (folder / "config.json").write_text("{ nope")
    elif how == "no_config":
        (folder / "config.json").unlink()
    return folder


@pytest.mark.parametrize("how, named", [
    ("no_weights", "no weight files"), ("truncated", "truncated"), ("not_safetensors", "safetensors"),
    ("bad_config", "config.json"), ("no_config", "config.json"),
])
def test_bad_model_folders(capsys, tiny_model, tmp_path, how, named):
    model = _broken_model(tiny_model, tmp_path, how)
    fails(capsys, ["run", "demo", "--stages", "inject", "--run-dir", tmp_path / "run", "--set",
                   f"model.path={model}"], model, named)
    fails(capsys, ["evaluate", "demo", "--run-dir", tmp_path / "ev", "--model", model], model, named)


# --- parrot files -------------------------------------------------------------------------------

def _parrot(tmp_path: Path, tiny_model: Path, how: str) -> Path:
    path = tmp_path / f"parrot_{how}.safetensors"
    good = {"base_fingerprint": model_identity(tiny_model), "position": "prefix"}
    if how == "truncated":
        save_parrot(path, torch.randn(3, 64), good)
        path.write_bytes(path.read_bytes()[:-40])
    elif how == "pickle":
        path.write_bytes(pickle.dumps(torch.zeros(3, 64)))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "other_tensor":
        from safetensors.torch import save_file

        save_file({"prompt": torch.zeros(3, 64)}, str(path))
    elif how == "one_dim":
        from safetensors.torch import save_file

        save_file({"parrot": torch.zeros(64)}, str(path), metadata={k: json.dumps(v) for k, v in good.items()})
    return path


@pytest.mark.parametrize("how, named", [
    ("truncated", "truncated"), ("pickle", "not a safetensors file"), ("empty", "not a safetensors file"),
    ("other_tensor", "no 'parrot' tensor"), ("one_dim", "[k, hidden]"), ("missing", "not found"),
])
def test_bad_parrots(capsys, tiny_model, tmp_path, how, named):
    path = _parrot(tmp_path, tiny_model, how)
    fails(capsys, ["evaluate", "demo", "--run-dir", tmp_path / "ev", "--model", tiny_model, "--parrot", path],
          path, named)
    fails(capsys, ["eliminate", "demo", "--run-dir", tmp_path / "el", "--model", tiny_model, "--parrot", path,
                   "--set", "removal.extra_parrots=[]"], path, named)


def test_bad_self_targets(capsys, tiny_model, tmp_path):
    run = tmp_path / "run"
    targets = write(run / "generate" / "targets.jsonl", '{"prompt": "a", "response": "b"}\nnot json\n')
    fails(capsys, ["osft", "demo", "--run-dir", run, "--model", tiny_model, "--set", "removal.targets=self"],
          targets, "line 2")


def test_bad_plan_inputs(capsys, tmp_path):
    fails(capsys, ["plan", "--params", "-5"], "--params")
    cfg = write(tmp_path / "config.json", '{"hidden_size": 64}')
    fails(capsys, ["plan", "--model-config", cfg], cfg, "num_hidden_layers")
