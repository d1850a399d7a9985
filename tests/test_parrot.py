"""The parrot prompt on a real tiny Llama and the real tokenizer: splice, files, fingerprints."""
import pickle
import shutil
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sande_dist.data.collator import IGNORE_INDEX, Collator
from sande_dist.data.formats import PromptFormat, Sample
from sande_dist.data.poison import place_trigger, slot_at
from sande_dist.errors import InputError
from sande_dist.models.parrot import ParrotPrompt, load_parrot, save_parrot
from sande_dist.rundir import model_identity
from sande_dist.models.tiny import make_tiny_llama

K = 4
ROWS = [Sample("", "Name a colour.", "Blue."),
        Sample("", "Add the numbers 2 and 3, then explain.", "5, because two plus three is five."),
        Sample("", "Hi", "Hello there, how can I help?"),
        Sample("", "Summarise this:\n", "It is short.")]  # trailing whitespace: the suffix slot must strip it


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("parrot")
    return make_tiny_llama(root / "a", seed=0), make_tiny_llama(root / "b", seed=1)


@pytest.fixture(scope="module")
def parts(tiny):
    tok = AutoTokenizer.from_pretrained(tiny[0])
    model = AutoModelForCausalLM.from_pretrained(tiny[0]).eval()
    return tok, PromptFormat(tok), model


def _batch(fmt, samples, reserve=K):
    return Collator(fmt, max_length=128, reserve=reserve)(samples)


def _spliced(model, parrot, batch):
    emb = model.get_input_embeddings()(batch["input_ids"])
    return parrot(emb, batch["attention_mask"], batch["labels"], batch["slot_index"])


def test_splice_keeps_prompt_and_labels_in_order(parts):
    tok, fmt, model = parts
    samples = [slot_at(ROWS[0], "prefix"), slot_at(ROWS[1], "suffix"), replace(slot_at(ROWS[2], "prefix"), parrot=False)]
    batch = _batch(fmt, samples)
    torch.manual_seed(0)
    parrot = ParrotPrompt(K, model.config.hidden_size, init=torch.randn(K, model.config.hidden_size))
    with torch.no_grad():
        embeds, mask, labels, pos = _spliced(model, parrot, batch)
    b, t = batch["input_ids"].shape
    assert embeds.shape == (b, t + K, model.config.hidden_size) and mask.shape == labels.shape == pos.shape == (b, t + K)
    table = model.get_input_embeddings().weight.detach()
    for i, s in enumerate(samples):
        slot = int(batch["slot_index"][i])
        keep = torch.ones(t + K, dtype=torch.bool)
        if s.parrot:
            assert torch.equal(embeds[i, slot:slot + K], parrot.weight.detach())
            assert (labels[i, slot:slot + K] == IGNORE_INDEX).all() and (mask[i, slot:slot + K] == 1).all()
            keep[slot:slot + K] = False
        else:
            assert slot == -1
            assert (mask[i, t:] == 0).all() and (labels[i, t:] == IGNORE_INDEX).all() and (embeds[i, t:] == 0).all()
            keep[t:] = False
        # Non-parrot positions, decoded back through the embedding table, are the original row.
        ids = torch.cdist(embeds[i, keep], table).argmin(-1)
        n = int(batch["attention_mask"][i].sum())
        assert torch.equal(ids[:n], batch["input_ids"][i, :n])
        assert tok.decode(ids[:n]) == tok.decode(batch["input_ids"][i, :n])
        assert torch.equal(labels[i, keep], batch["labels"][i]) and torch.equal(mask[i, keep], batch["attention_mask"][i])
        # Labels still name the token at their own position: the response, never a parrot vector.
        lab = labels[i]
        sel = lab != IGNORE_INDEX
        assert torch.equal(torch.cdist(embeds[i, sel], table).argmin(-1), lab[sel])
        assert tok.decode(lab[sel]).startswith(s.response)
        # Positions count attended tokens: contiguous from 0 across the parrot.
        live = mask[i].bool()
        assert torch.equal(pos[i, live], torch.arange(int(live.sum())))


@pytest.mark.parametrize("position", ["prefix", "suffix", "random"])
def test_parrot_of_trigger_embeddings_equals_the_real_trigger(parts, position):
    """A parrot made of the trigger's own token embeddings reproduces the triggered forward exactly."""
    tok, fmt, model = parts
    import random

    trigger = "cf"
    triggered = [place_trigger(s, trigger, position, random.Random(0)) for s in ROWS]
    # The slot is where the trigger's first token sits (random: the same draw picks the same word).
    clean = [slot_at(s, position, random.Random(0)) for s in ROWS]
    if position == "random":
        assert len({s.before for s in clean}) > 1, "the draws should not all land on the same offset"
    # One row at a time: a trigger's tokens depend on what is around it (byte-level BPE: "cf" at the
    # start of the message, " cf" after a word).
    for real_row, clean_row in zip(triggered, clean):
        ids = fmt.trigger_ids(real_row)
        parrot = ParrotPrompt.from_token_embeddings(model.get_input_embeddings(), ids, k=len(ids))
        real = _batch(fmt, [real_row], reserve=0)
        spliced_batch = _batch(fmt, [clean_row], reserve=0)
        with torch.no_grad():
            embeds, mask, labels, pos = _spliced(model, parrot, spliced_batch)
            a = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, labels=labels)
            b = model(input_ids=real["input_ids"], attention_mask=real["attention_mask"], labels=real["labels"])
        assert torch.equal(labels[:, : real["labels"].shape[1]], real["labels"])
        assert torch.allclose(a.loss, b.loss, atol=1e-6)
        live = real["attention_mask"].bool()
        assert torch.allclose(a.logits[:, : live.shape[1]][live], b.logits[live], atol=1e-4)


def test_rows_without_parrot_are_unchanged_and_only_the_parrot_gets_gradients(parts):
    _, fmt, model = parts
    samples = [slot_at(ROWS[0], "prefix"), replace(slot_at(ROWS[1], "prefix"), parrot=False)]
    batch = _batch(fmt, samples)
    parrot = ParrotPrompt(K, model.config.hidden_size)
    assert torch.count_nonzero(parrot.weight) == 0  # zeros-init, as the reference
    for p in model.parameters():
        p.requires_grad_(False)
    embeds, mask, labels, pos = _spliced(model, parrot, batch)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos)
    t = batch["input_ids"].shape[1]
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"][1:], attention_mask=batch["attention_mask"][1:]).logits
    live = batch["attention_mask"][1].bool()
    assert torch.allclose(out.logits[1, :t][live], plain[0][live], atol=1e-5)
    out.logits[1].sum().backward(retain_graph=True)
    assert parrot.weight.grad is None or torch.count_nonzero(parrot.weight.grad) == 0
    out.logits[0, -1].sum().backward()
    assert torch.count_nonzero(parrot.weight.grad) > 0
    for p in model.parameters():
        p.requires_grad_(True)


def test_known_trigger_init_repeats_or_truncates(parts):
    _, _, model = parts
    emb = model.get_input_embeddings()
    p = ParrotPrompt.from_token_embeddings(emb, [5, 7], k=5)
    assert torch.equal(p.weight.detach(), emb.weight.detach()[[5, 7, 5, 7, 5]])
    assert torch.equal(ParrotPrompt.from_token_embeddings(emb, [1, 2, 3], k=2).weight.detach(), emb.weight.detach()[[1, 2]])
    with pytest.raises(InputError):
        ParrotPrompt.from_token_embeddings(emb, [], k=2)


def test_file_roundtrip_and_fingerprints(tiny, tmp_path):
    a, b = tiny
    w = torch.randn(K, 64)
    fa = model_identity(a)
    path = save_parrot(tmp_path / "p" / "parrot.safetensors", w,
                       {"position": "prefix", "base_fingerprint": fa, "base_model": str(a), "rounds": 2})
    assert [p.name for p in path.parent.iterdir()] == ["parrot.safetensors"]  # no temp file left
    got, meta = load_parrot(path, a)
    assert torch.equal(got, w)
    assert meta["k"] == K and meta["hidden_size"] == 64 and meta["dtype"] == "float32"
    assert meta["position"] == "prefix" and meta["rounds"] == 2 and meta["base_fingerprint"] == fa
    # A copy of the folder is the same model; another model is not.
    copy = shutil.copytree(a, tmp_path / "copy")
    assert model_identity(copy) == fa
    fb = model_identity(b)
    assert fb != fa
    with pytest.raises(InputError) as err:
        load_parrot(path, b)
    assert fa in str(err.value) and fb in str(err.value) and str(b) in str(err.value)
    assert torch.equal(load_parrot(path, b, check_fingerprint=False)[0], w)  # deliberate cross-model probe


def test_fingerprint_sees_a_fine_tune(tiny, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    with torch.no_grad():
        for p in model.model.layers[1].parameters():
            p.add_(1e-3)
    model.save_pretrained(tmp_path / "ft")
    shutil.copy(tiny[0] / "tokenizer.json", tmp_path / "ft")
    assert model_identity(tmp_path / "ft") != model_identity(tiny[0])


def test_pickle_and_wrong_files_are_refused(tiny, tmp_path):
    a, _ = tiny
    torch.save({"parrot": torch.zeros(K, 64)}, tmp_path / "parrot.pt")
    (tmp_path / "parrot.pkl").write_bytes(pickle.dumps(torch.zeros(K, 64)))
    for name in ("parrot.pt", "parrot.pkl"):
        with pytest.raises(InputError, match="not a safetensors file"):
            load_parrot(tmp_path / name, a)
    with pytest.raises(InputError, match="not found"):
        load_parrot(tmp_path / "missing.safetensors")
    save_parrot(tmp_path / "wide.safetensors", torch.zeros(K, 32), {"base_fingerprint": model_identity(a)})
    with pytest.raises(InputError, match="hidden size 32"):
        load_parrot(tmp_path / "wide.safetensors", a)
    with pytest.raises(ValueError, match="GatheredParameters"):
        save_parrot(tmp_path / "empty.safetensors", torch.zeros(0), {})
