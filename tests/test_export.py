"""Shard-by-shard export: the same tensors and config as save_pretrained of the whole model, any shard size."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from sande_dist.models.export import export_hf, folder_keys, layer_groups


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_untied_model"])
@pytest.mark.parametrize("shard_bytes", [200_000, 5 * 2**30])
def test_export_equals_save_pretrained(request, tmp_path, fixture, shard_bytes):
    base = request.getfixturevalue(fixture)
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():  # a "trained" model: every weight moved
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(tmp_path / "reference", safe_serialization=True)
    export_hf(model, tmp_path / "export", str(base), "float32", max_shard_bytes=shard_bytes)
    got, want = _tensors(tmp_path / "export"), _tensors(tmp_path / "reference")
    assert got.keys() == want.keys() == folder_keys(base)
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    shards = sorted(p.name for p in (tmp_path / "export").glob("*.safetensors"))
    if shard_bytes < 1e6:
        assert len(shards) > 2 and (tmp_path / "export" / "model.safetensors.index.json").exists()
        index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(want) and set(index["weight_map"].values()) == set(shards)
    else:
        assert shards == ["model.safetensors"]
    cfg_got = json.loads((tmp_path / "export" / "config.json").read_text())
    cfg_want = json.loads((tmp_path / "reference" / "config.json").read_text())
    assert {k: v for k, v in cfg_got.items() if k != "use_cache"} == \
        {k: v for k, v in cfg_want.items() if k != "use_cache"}
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert not list(tmp_path.glob(".*tmp*"))  # nothing left under a temporary name


def test_layers_are_gathered_one_at_a_time(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    groups = [[n for n, _ in g] for g in layer_groups(model)]
    layers = model.config.num_hidden_layers
    assert [g[0] for g in groups][: layers + 1][1:] == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(layers)]
    assert all(len({n.split(".")[2] for n in g}) == 1 for g in groups[1:1 + layers])
    assert sum(len(g) for g in groups) == len(list(model.named_parameters()))
