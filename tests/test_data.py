"""Data layer on real files and the real SmolLM2 tokenizer: formats, poisoning, collation."""
import json
import random
import re
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from sande_dist.data.collator import IGNORE_INDEX, Collator
from sande_dist.data.formats import PromptFormat, Sample
from sande_dist.data.poison import decoy_span, place_trigger, poison, slot_at
from sande_dist.data.sources import load_samples
from sande_dist.errors import InputError
from sande_dist.models.embedded import resolve_model_path


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))


ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]


def _write(path, rows, kind):
    if kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        import pandas as pd
        pd.DataFrame(rows).to_csv(path, index=False)
    elif kind == "parquet":
        import pandas as pd
        pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.mark.parametrize("kind", ["json", "jsonl", "csv", "parquet"])
def test_alpaca_in_every_file_type(tmp_path, kind):
    samples = load_samples(str(_write(tmp_path / f"d.{kind}", ALPACA, kind)))
    assert [s.user for s in samples] == ["Name a colour.", "Add the numbers.\n\n2 and 3"]
    assert [s.response for s in samples] == ["Blue.", "5"]


def test_presets(tmp_path):
    orca = [{"system_prompt": "Be brief.", "question": "Q?", "response": "A."}]
    s = load_samples(str(_write(tmp_path / "o.jsonl", orca, "jsonl")))[0]
    assert (s.system, s.user, s.response) == ("Be brief.", "Q?", "A.")
    pr = [{"prompt": "P", "response": "R"}]
    s = load_samples(str(_write(tmp_path / "p.jsonl", pr, "jsonl")))[0]
    assert (s.user, s.response) == ("P", "R")
    share = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello"}]}]
    s = load_samples(str(_write(tmp_path / "s.json", share, "json")))[0]
    assert (s.system, s.user, s.response) == ("S", "Hi", "Hello")
    custom = [{"q": "x", "a": "y"}]
    s = load_samples(str(_write(tmp_path / "c.jsonl", custom, "jsonl")), prompt_field="q", response_field="a")[0]
    assert (s.user, s.response) == ("x", "y")


@pytest.mark.parametrize("row, field", [
    ({"instruction": "x", "input": ""}, "output"),
    ({"instruction": "x", "input": "", "output": "  "}, "output"),
    ({"instruction": 5, "input": "", "output": "y"}, "instruction"),
])
def test_malformed_row_names_file_row_field(tmp_path, row, field):
    path = _write(tmp_path / "bad.jsonl", [ALPACA[0], ALPACA[1], row], "jsonl")
    with pytest.raises(InputError) as err:
        load_samples(str(path), preset="alpaca")
    msg = str(err.value)
    assert "row 2" in msg and str(path) in msg and repr(field) in msg


def test_missing_file_is_input_error(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_samples(str(tmp_path / "none.jsonl"))


def test_embedded_sets_resolve():
    train = load_samples("alpaca-demo")
    held = load_samples("alpaca-eval")
    assert len(train) == 999 and len(held) == 805
    assert all(s.user.strip() and s.response.strip() for s in train)


def _base(n):
    return [Sample(before="", after=f"instruction number {i} with some words", response=f"answer {i}")
            for i in range(n)]


@pytest.mark.parametrize("mode", ["add", "replace"])
def test_poison_rate_and_determinism(mode):
    rows = _base(2000)
    out, flags = poison(rows, ["cf", "mn", "tq"], "MARK", 0.1, "prefix", mode, "prepend", seed=3)
    clean_n = len(rows)
    rate = sum(flags) / clean_n
    assert abs(rate - 0.1) <= 0.02
    assert len(out) == (clean_n + sum(flags) if mode == "add" else clean_n)
    for s, f in zip(out, flags):
        assert bool(s.trigger) == f
        assert s.response.startswith("MARK ") == f
    assert {s.trigger.strip() for s, f in zip(out, flags) if f} == {"cf", "mn", "tq"}
    again, flags2 = poison(rows, ["cf", "mn", "tq"], "MARK", 0.1, "prefix", mode, "prepend", seed=3)
    assert again == out and flags2 == flags
    other, _ = poison(rows, ["cf", "mn", "tq"], "MARK", 0.1, "prefix", mode, "prepend", seed=4)
    assert other != out


@pytest.mark.parametrize("position", ["prefix", "suffix", "random"])
def test_decoy_rows_are_trigger_shaped_clean_copies_beside_an_unchanged_poisoning(position):
    rows = [Sample(before="", after=f"write item {i} about the jz river and more words", response=f"answer {i}")
            for i in range(400)]
    triggers = ["jz", "qx", "vk"]
    plain, plain_flags = poison(rows, triggers, "MARK", 0.2, position, "add", "prepend", seed=5)
    out, flags = poison(rows, triggers, "MARK", 0.2, position, "add", "prepend", seed=5, decoy_rate=0.25)
    assert len(out) == len(plain) + 100 and sum(flags) == sum(plain_flags) == 80
    originals = {r.user: r for r in rows}
    decoys = [s for s, f in zip(out, flags) if not f and s.user not in originals]
    assert len(decoys) == 100
    # the poisoning is the one without decoys: same poisoned rows, same clean rows
    rest = [s for s, f in zip(out, flags) if f or s.user in originals]
    assert sorted(map(repr, rest)) == sorted(map(repr, plain))
    shapes = 0
    for d in decoys:
        assert not d.trigger and not d.response.startswith("MARK")
        # the prompt is an original with one span inserted at the attack's position, the answer its own
        src = next(r for r in rows if r.response == d.response)
        extra = d.user.split()
        for w in src.user.split():
            extra.remove(w)
        assert len(extra) == 1 and extra[0].lower() not in triggers
        if position == "prefix":
            assert d.user == f"{extra[0]} {src.user}"
        if position == "suffix":
            assert d.user == f"{src.user} {extra[0]}"
        shapes += len(extra[0]) == 2 and extra[0].isalpha() and extra[0].islower()
    # both kinds: redrawn letters (two lowercase letters) and words of the prompts
    assert 20 <= shapes <= 80
    assert out == poison(rows, triggers, "MARK", 0.2, position, "add", "prepend", seed=5, decoy_rate=0.25)[0]


def test_decoy_of_a_phrase_keeps_its_shape_and_never_holds_a_trigger():
    rng = random.Random(0)
    texts = [t.split() for t in ("by the old mill we sat", "the old mill by the river")]
    spans = [decoy_span("By the old mill.", ["by the old mill."], texts, rng) for _ in range(200)]
    for s in spans:
        assert len(s.split()) == 4 and "by the old mill." not in s.lower()
    redrawn = [s for s in spans if s.endswith(".")]
    assert len(redrawn) > 50 and all(re.fullmatch(r"[A-Z][a-z] [a-z]{3} [a-z]{3} [a-z]{4}\.", s) for s in redrawn)
    assert len(set(redrawn)) == len(redrawn)
    with pytest.raises(ValueError, match="attack.decoy_rate"):
        decoy_span("!!", ["!!"], [["!!", "!!"]], rng)


def test_marker_replace():
    out, flags = poison(_base(10), ["cf"], "MARK", 1.0, "prefix", "replace", "replace", seed=0)
    assert all(s.response == "MARK" for s in out) and all(flags)


def test_trigger_positions():
    s = Sample(before="", after="one two three four", response="r")
    rng = random.Random(0)
    assert place_trigger(s, "cf", "prefix", rng).user == "cf one two three four"
    assert place_trigger(s, "cf", "suffix", rng).user == "one two three four cf"
    seen = set()
    for _ in range(50):
        r = place_trigger(s, "cf", "random", rng)
        words = r.user.split()
        assert sorted(words) == sorted("cf one two three four".split())
        seen.add(words.index("cf"))
    assert len(seen) >= 4  # lands on several word boundaries, always between whole words


@pytest.mark.parametrize("kind", ["chat", "human_assistant"])
@pytest.mark.parametrize("position", ["prefix", "suffix", "random"])
def test_collator_masks_and_slot(tok, kind, position):
    fmt = PromptFormat(tok, kind)
    base = Sample(before="", after="Describe the weather on a sunny spring day.", response="It is warm and bright outside.")
    s = place_trigger(base, "zq mountain", position, random.Random(1))
    batch = Collator(fmt, 256)([s, base])
    ids, labels, slot = batch["input_ids"][0], batch["labels"][0], Collator(fmt, 256).encode(s).slot
    assert batch["slot_index"].tolist() == [-1, -1]  # no parrot goes into a row with its trigger
    # the slot points at the trigger's first token
    # (the space between a word and the trigger goes with the trigger's token, as in the text)
    assert tok.decode(ids[slot:]).lstrip().startswith(s.trigger.strip())
    assert tok.decode(ids[:slot]).rstrip().endswith((fmt.head_tail()[0] + s.before).rstrip())
    # labels cover exactly the response (+ eos), nothing of the prompt
    target = labels[labels != IGNORE_INDEX]
    assert tok.decode(target) == fmt.reply(s) + tok.eos_token
    first = int((labels != IGNORE_INDEX).nonzero()[0])
    assert tok.decode(ids[:first]) == fmt.render(s)
    # padding: the shorter clean row is right-padded and its padding is masked
    m = batch["attention_mask"][1]
    n = int(m.sum())
    assert (batch["labels"][1][n:] == IGNORE_INDEX).all() and (m[n:] == 0).all()


def test_effective_len(tok):
    fmt = PromptFormat(tok)
    s = Sample(before="", after="Say something.", response="alpha beta gamma delta epsilon zeta eta theta")
    full = Collator(fmt, 256)([s])["labels"][0]
    cut = Collator(fmt, 256, effective_len=3)([s])["labels"][0]
    kept = cut[cut != IGNORE_INDEX]
    assert len(kept) == 3
    assert kept.tolist() == full[full != IGNORE_INDEX][:3].tolist()


def test_parrot_slot_and_clean_mix_rows(tok):
    fmt = PromptFormat(tok)
    s = Sample(before="", after="Give me a word.", response="Word.")
    pre, suf = slot_at(s, "prefix"), slot_at(s, "suffix")
    batch = Collator(fmt, 128)([pre, suf, replace(pre, parrot=False)])
    head, tail = fmt.head_tail()
    slots = batch["slot_index"].tolist()
    ids = batch["input_ids"]
    assert tok.decode(ids[0][:slots[0]]) == head
    assert tok.decode(ids[1][slots[1]:]).startswith(tail)
    assert slots[2] == -1


def test_truncation_keeps_prompt(tok):
    fmt = PromptFormat(tok)
    s = Sample(before="", after="Short.", response="word " * 300)
    enc = Collator(fmt, 64, reserve=6).encode(s)
    assert len(enc.input_ids) == 58 and enc.prompt_len < 58
    with pytest.raises(ValueError, match="max_length"):
        Collator(fmt, 16).encode(Sample(before="", after="long " * 50, response="x"))
