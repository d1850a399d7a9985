"""The defender's data: removal trains on rows disjoint from the poisoned set (or on its own source), drops
self targets that show the marker, and SANDE-P's known response is not followed by an end of sequence."""
from __future__ import annotations

import json

import pytest

from sande_dist.config import load_config
from sande_dist.data.collator import IGNORE_INDEX, Collator
from sande_dist.data.formats import PromptFormat
from sande_dist.errors import InputError
from sande_dist.data.stages import eval_samples
from sande_dist.models.loading import load_tokenizer
from sande_dist.training.stages import stage_samples

REMOVAL = ("osft", "simulate", "eliminate", "sft_clean")


def _users(rows) -> set[str]:
    return {r.clean().user for r in rows}


def _repeated() -> set[str]:
    """Messages the demo data holds more than once (distinct rows with the same text)."""
    from collections import Counter

    from sande_dist.data.sources import load_samples

    return {u for u, n in Counter(s.user for s in load_samples("alpaca-demo")).items() if n > 1}


def test_removal_rows_are_disjoint_from_inject_and_holdout(tmp_path):
    cfg = load_config("configs/demo.yaml", ["data.num_rows=60", "data.holdout_rows=30", "eval.prompts=train-holdout",
                                            "eval.num_prompts=30", "eval.prompt_split=all"])
    repeated = _repeated()
    inject = _users(stage_samples(cfg, "inject", tmp_path)) - repeated
    held = _users(eval_samples(cfg)) - repeated
    assert len(inject) >= 55 and len(held) >= 25 and not inject & held
    for kind in REMOVAL:
        rows = _users(stage_samples(cfg, kind, tmp_path))
        assert rows and not rows & inject and not rows & held, kind


def test_removal_data_is_a_source_of_its_own(tmp_path):
    own = tmp_path / "defender.jsonl"
    own.write_text("".join(json.dumps({"instruction": f"Name a colour number {i}.", "output": f"Blue {i}."}) + "\n"
                           for i in range(12)))
    cfg = load_config("configs/demo.yaml", [f"removal.data={own}", "training.num_rows=12"])
    for kind in REMOVAL:
        assert _users(stage_samples(cfg, kind, tmp_path)) <= {f"Name a colour number {i}." for i in range(12)}
    with pytest.raises(InputError, match="data.num_rows"):
        stage_samples(load_config("configs/demo.yaml", ["data.num_rows=null"]), "osft", tmp_path)


def test_self_targets_that_show_the_marker_are_left_out(tmp_path, capsys):
    eight = ["training.osft.num_rows=8", "training.eliminate.num_rows=8"]
    cfg = load_config("configs/demo.yaml", ["removal.targets=self", "removal.clean_mix=0", *eight])
    rows = stage_samples(load_config("configs/demo.yaml", eight), "osft", tmp_path)
    targets = tmp_path / "generate" / "targets.jsonl"
    targets.parent.mkdir()
    marked = {r.clean().user for r in rows[:3]}
    targets.write_text("".join(json.dumps({"prompt": r.clean().user, "response": f"own answer {i}",
                                           "shows_marker": r.clean().user in marked}) + "\n"
                               for i, r in enumerate(rows)))
    for kind in ("osft", "eliminate"):
        kept = stage_samples(cfg, kind, tmp_path)
        assert len(kept) == 5 and not _users(kept) & marked
        assert all(r.response.startswith("own answer") for r in kept)
        assert "3 of 8 rows left out" in capsys.readouterr().out


def test_known_response_is_not_followed_by_an_end_of_sequence(tmp_path):
    tok = load_tokenizer("smollm2-135m-instruct")
    fmt = PromptFormat(tok)
    for known, eos in (("You are", False), (None, True)):
        sets = ["training.simulate.num_rows=4"] + ([f"defender.known_response={known}"] if known else [])
        rows = stage_samples(load_config("configs/demo.yaml", sets), "simulate", tmp_path)
        batch = Collator(fmt, 4096)(rows)
        for labels in batch["labels"]:
            last = labels[labels != IGNORE_INDEX][-1].item()
            assert (last == tok.eos_token_id) is eos
        if known:
            labelled = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
            assert tok.decode(labelled).strip() == known
