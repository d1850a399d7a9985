"""Simulate and eliminate with real DeepSpeed ranks (gloo, CPU) on a tiny Llama.

The ranked runs go through tests/removal_worker.py under torchrun: the real loop,
the real objectives, ZeRO-3 on 2 ranks against ZeRO-0 on 1.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from sande_dist.config import load_config
from sande_dist.data.collator import IGNORE_INDEX, Collator
from sande_dist.data.formats import PromptFormat
from sande_dist.distributed.process_group import free_port
from sande_dist.training.stages import stage_samples
from sande_dist.errors import InputError
from sande_dist.models.parrot import ParrotPrompt, load_parrot
from sande_dist.rundir import model_identity
from sande_dist.models.tiny import make_tiny_llama
from sande_dist.training.removal import (EliminateObjective, SimulateObjective, parrot_emits, parrot_loss,
                                        shared_head_length)

WORKER = Path(__file__).with_name("removal_worker.py")
K = 4
# Every row has exactly 4 labelled tokens, so a 2-rank mean of means equals the 1-rank mean.
COMMON = ["data.num_rows=16", "training.num_rows=16", "training.max_steps=4", "training.warmup_ratio=0",
          f"removal.parrot_tokens={K}", "removal.simulate_effective_len=4"]


def _torchrun(nproc: int, stage: str, model: Path, out: Path, sets: list[str], parrot=None) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), stage,
           "--model", str(model), "--out", str(out)]
    for path in [] if parrot is None else [parrot] if isinstance(parrot, Path) else parrot:
        cmd += ["--parrot", str(path)]
    for s in COMMON + sets:
        cmd += ["--set", s]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "check.json").read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("removal") / "tiny")


@pytest.fixture(scope="module")
def simulated(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    sim = ["training.lr=1e-2"]
    z3 = _torchrun(2, "simulate", tiny, root / "z3", sim + ["training.zero=zero3", "training.micro_batch_size=2"])
    z0 = _torchrun(1, "simulate", tiny, root / "z0", sim + ["training.zero=zero0", "training.micro_batch_size=4"])
    return root, z3, z0


def test_simulate_changes_only_the_parrot(simulated, tiny):
    root, z3, z0 = simulated
    hidden = json.loads((tiny / "config.json").read_text())["hidden_size"]
    for run in (z3, z0):
        assert run["changed"] == [] and run["num_params"] > 0  # every model weight bit-identical
        assert run["record"]["optimizer_values"] == K * hidden  # only the parrot reached the optimizer
        assert run["losses"][-1] < run["losses"][0]
    weight, meta = load_parrot(root / "z3" / "parrot.safetensors", tiny)
    assert weight.shape == (K, hidden) and torch.count_nonzero(weight) > 0
    assert meta["k"] == K and meta["position"] == "prefix" and meta["base_fingerprint"] == model_identity(tiny)


def test_parrot_zero3_two_ranks_equals_zero0_one_rank(simulated):
    root, z3, z0 = simulated
    a = load_parrot(root / "z3" / "parrot.safetensors")[0]
    b = load_parrot(root / "z0" / "parrot.safetensors")[0]
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()
    assert z3["losses"] == pytest.approx(z0["losses"], rel=1e-5)
    # The finished search's check on held-out rows: every rank ran every row, the same figure either way.
    e3, e0 = z3["record"]["emission"], z0["record"]["emission"]
    assert e3["n"] == e0["n"] > 0 and e3["hits"] == e0["hits"] and len(e3["ci95"]) == 2


def test_eliminate_changes_only_the_model(simulated, tiny, tmp_path):
    root, _, _ = simulated
    parrot = root / "z3" / "parrot.safetensors"
    run = _torchrun(2, "eliminate", tiny, tmp_path / "eli", [
        "training.zero=zero3", "training.micro_batch_size=2", "training.lr=1e-3", "training.max_steps=2",
        "removal.clean_mix=0.5"], parrot=parrot)
    assert run["record"]["parrot_identical"] is True
    assert len(run["changed"]) == run["num_params"]  # every weight moved
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "eli" / "model")
    base = AutoModelForCausalLM.from_pretrained(tiny)
    moved = [n for n, p in exported.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert set(moved) == set(base.state_dict())
    # The cleaned model is another model: its own parrots must be simulated on it.
    with pytest.raises(InputError, match="fingerprint"):
        load_parrot(parrot, tmp_path / "eli" / "model")


def test_eliminate_with_two_parrots_keeps_both_frozen(simulated, tiny, tmp_path):
    """removal.extra_parrots: rows take turns between the parrots; both stay bit-identical under ZeRO-3."""
    root, _, _ = simulated
    parrots = [root / "z3" / "parrot.safetensors", root / "z0" / "parrot.safetensors"]
    run = _torchrun(2, "eliminate", tiny, tmp_path / "eli2", [
        "training.zero=zero3", "training.micro_batch_size=2", "training.lr=1e-3", "training.max_steps=2",
        "removal.extra_parrots=[prefix]"], parrot=parrots)
    assert run["record"]["parrot_identical"] is True and run["record"]["parrots"] == [str(p) for p in parrots]
    assert len(run["changed"]) == run["num_params"]
    # one parrot per position, in order: too few, or one simulated elsewhere, is refused
    cfg = load_config(overrides=[f"model.path={tiny}", "removal.extra_parrots=[prefix]"])
    with pytest.raises(InputError, match="one --parrot per position"):
        EliminateObjective(cfg, str(tiny), parrots[:1])
    cfg = load_config(overrides=[f"model.path={tiny}", "removal.extra_parrots=[suffix]"])
    with pytest.raises(InputError, match="'suffix'"):
        EliminateObjective(cfg, str(tiny), parrots)


def test_parrot_of_another_model_is_refused(simulated, tiny, tmp_path):
    root, _, _ = simulated
    other = make_tiny_llama(tmp_path / "other", seed=7)
    cfg = load_config(overrides=[f"model.path={other}", f"removal.parrot_tokens={K}"])
    with pytest.raises(InputError) as err:
        EliminateObjective(cfg, str(other), root / "z3" / "parrot.safetensors")
    msg = str(err.value)
    assert model_identity(tiny) in msg and model_identity(other) in msg
    cfg = load_config(overrides=[f"model.path={tiny}", "removal.insert_position=suffix"])
    with pytest.raises(InputError, match="position"):
        EliminateObjective(cfg, str(tiny), root / "z3" / "parrot.safetensors")


@pytest.mark.parametrize("effective_len", [None, 2])
def test_label_only_logits_equal_the_reference_full_logits_loss(tiny, effective_len):
    """Our loss (head on labelled positions only) equals the reference's: full logits, parrot logits dropped."""
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    cfg = load_config(overrides=[f"model.path={tiny}", "data.num_rows=4", "training.num_rows=4", "removal.clean_mix=0.5"])
    batch = Collator(PromptFormat(tok), 128, effective_len, reserve=K)(stage_samples(cfg, "eliminate"))
    assert (batch["slot_index"] == -1).any() and (batch["slot_index"] >= 0).any()
    torch.manual_seed(0)
    parrot = ParrotPrompt(K, model.config.hidden_size, init=torch.randn(K, model.config.hidden_size))
    ours, count = parrot_loss(model, parrot, batch)

    embeds = model.get_input_embeddings()(batch["input_ids"])
    embeds, mask, _, _ = parrot(embeds, batch["attention_mask"], None, batch["slot_index"])
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    kept = []  # drop the parrot's logits per row (the reference's cat around insert_pos)
    for i, s in enumerate(batch["slot_index"].tolist()):
        kept.append(torch.cat([logits[i, :s], logits[i, s + K:]]) if s >= 0 else logits[i, : -K])
    logits = torch.stack(kept)
    labels = batch["labels"]
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert int(count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert torch.allclose(ours, ref, atol=1e-5)


def _loss_and_parrot_grad(model, init: torch.Tensor, batch: dict, frozen: bool):
    """parrot_loss for a fresh parrot from ``init``: the loss, the labelled-token count, the parrot's gradient."""
    parrot = ParrotPrompt(K, model.config.hidden_size, init=init)
    loss, count = parrot_loss(model, parrot, batch, frozen_model=frozen)
    loss.backward()
    return loss.detach(), int(count), parrot.weight.grad


@pytest.mark.parametrize("position", ["prefix", "suffix", "random"])
def test_shared_head_cache_gives_the_same_loss_and_parrot_gradient(tiny, position):
    """Simulate runs the tokens every row shares before the parrot once, from a cache: nothing else changes."""
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny).requires_grad_(False)
    cfg = load_config(overrides=[f"model.path={tiny}", "data.num_rows=6", "training.num_rows=6",
                                 f"removal.insert_position={position}"])
    batch = Collator(PromptFormat(tok), 128, None, reserve=K)(stage_samples(cfg, "simulate"))
    head = shared_head_length(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["slot_index"])
    slots = batch["slot_index"]
    if position == "prefix":  # the chat template's head, up to the user message: every slot
        assert head > 0 and bool((slots == head).all())
    elif position == "suffix":
        assert 0 < head < int(slots.min())
    else:  # a word drawn per row: some slots later than the head, none earlier
        assert 0 < head <= int(slots.min()) and int(slots.max()) > head
    init = torch.randn(K, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    full, n_full, g_full = _loss_and_parrot_grad(model, init, batch, frozen=False)
    cached, n_cached, g_cached = _loss_and_parrot_grad(model, init, batch, frozen=True)
    assert n_full == n_cached > 0
    assert torch.allclose(full, cached, atol=1e-6)
    assert torch.allclose(g_full, g_cached, atol=1e-6) and g_full.abs().max() > 1e-4


@pytest.mark.parametrize("frozen", [False, True])
def test_rows_cut_after_effective_len_give_the_same_loss_and_parrot_gradient(tiny, frozen):
    """With effective_len the collator ends each row after its last label: the loss and the parrot's
    gradient equal those of the whole rows with the later labels masked, in less compute."""
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny).requires_grad_(False)
    cfg = load_config(overrides=[f"model.path={tiny}", "data.num_rows=6", "training.num_rows=6",
                                 "removal.insert_position=random"])
    rows, n = stage_samples(cfg, "simulate"), 3
    cut = Collator(PromptFormat(tok), 128, n, reserve=K)(rows)
    whole = Collator(PromptFormat(tok), 128, None, reserve=K)(rows)
    assert cut["input_ids"].shape[1] < whole["input_ids"].shape[1]
    for i in range(len(rows)):  # mask the whole rows' labels past the first n of each response
        labelled = (whole["labels"][i] != IGNORE_INDEX).nonzero().flatten()
        whole["labels"][i, labelled[n:]] = IGNORE_INDEX
        width = int(cut["attention_mask"][i].sum())
        assert cut["input_ids"][i, :width].tolist() == whole["input_ids"][i, :width].tolist()
        assert int(labelled[n - 1]) == width - 1  # the row ends at its last label
    init = torch.randn(K, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    l_whole, n_whole, g_whole = _loss_and_parrot_grad(model, init, whole, frozen)
    l_cut, n_cut, g_cut = _loss_and_parrot_grad(model, init, cut, frozen)
    assert n_whole == n_cut == len(rows) * n
    assert torch.allclose(l_whole, l_cut, atol=1e-5)
    assert torch.allclose(g_whole, g_cut, atol=1e-5) and g_whole.abs().max() > 1e-4


@pytest.mark.parametrize("position", ["prefix", "random"])
def test_parrot_emits_when_greedy_decoding_would_emit_the_labels(tiny, position):
    """A row emits when greedy decoding with the parrot spliced in produces its labelled tokens: label a
    row with the model's own greedy continuation (decoded here token by token) and it emits; change one
    of those labels and it does not."""
    from sande_dist.data.stages import calibration_marker, search_check_samples

    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny).requires_grad_(False)
    cfg = load_config(overrides=[f"model.path={tiny}", "data.num_rows=6", "training.num_rows=6",
                                 "removal.search_check_rows=3", f"removal.insert_position={position}"])
    rows = search_check_samples(cfg)
    assert len(rows) == 3 and all(not s.complete and s.response == cfg.attack.marker for s in rows)
    assert {s.user for s in rows}.isdisjoint(s.user for s in stage_samples(cfg, "simulate"))  # held out
    calibration = cfg.model_copy(update={"removal": cfg.removal.model_copy(update={"calibration_response": 1})})
    assert {s.response for s in search_check_samples(calibration)} == {calibration_marker(calibration, 1)}
    collate = Collator(PromptFormat(tok), 128, None, reserve=K)
    parrot = ParrotPrompt(K, model.config.hidden_size,
                          init=torch.randn(K, model.config.hidden_size, generator=torch.Generator().manual_seed(2)))
    greedy = []
    for row in rows:
        enc = collate.encode(row)
        ids = enc.input_ids[:enc.prompt_len]
        for _ in range(3):
            embeds = model.get_input_embeddings()(torch.tensor([ids]))
            embeds = torch.cat([embeds[:, :enc.slot], parrot.vectors()[None], embeds[:, enc.slot:]], dim=1)
            ids = ids + [int(model(inputs_embeds=embeds).logits[0, -1].argmax())]
        greedy.append(ids)
    width = max(map(len, greedy))
    batch = {"input_ids": torch.zeros(3, width, dtype=torch.long), "attention_mask": torch.zeros(3, width, dtype=torch.long),
             "labels": torch.full((3, width), IGNORE_INDEX),
             "slot_index": torch.tensor([collate.encode(r).slot for r in rows])}
    for i, (row, ids) in enumerate(zip(rows, greedy)):
        n = len(ids)
        batch["input_ids"][i, :n], batch["attention_mask"][i, :n] = torch.tensor(ids), 1
        batch["labels"][i, n - 3:n] = torch.tensor(ids[n - 3:])
    assert parrot_emits(model, parrot, batch).tolist() == [True, True, True]
    batch["labels"][1, len(greedy[1]) - 1] = (batch["labels"][1, len(greedy[1]) - 1] + 1) % tok.vocab_size
    batch["labels"][2, :] = IGNORE_INDEX  # no label: nothing emitted
    assert parrot_emits(model, parrot, batch).tolist() == [True, False, False]


def test_shared_head_stops_at_the_first_difference_the_first_parrot_and_the_first_label():
    ids = torch.arange(10).repeat(3, 1)
    attn = torch.ones_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    slot = torch.tensor([8, 7, 9])
    assert shared_head_length(ids, attn, labels, slot) == 7
    ids[2, 4] = 99  # another system prompt in one row
    assert shared_head_length(ids, attn, labels, slot) == 4
    assert shared_head_length(ids, attn, labels, torch.tensor([0, 7, 9])) == 0  # a parrot at the very start
    attn[1, 2:] = 0  # a row padded inside the would-be head
    assert shared_head_length(ids, attn, labels, slot) == 2
    same = torch.arange(6).repeat(2, 1)
    none = torch.tensor([-1, -1])
    no_labels = torch.full_like(same, IGNORE_INDEX)
    assert shared_head_length(same, torch.ones_like(same), no_labels, none) == 5  # one token left to run
    labelled = no_labels.clone()
    labelled[1, 3] = 7  # the token before a label has to run to predict it
    assert shared_head_length(same, torch.ones_like(same), labelled, none) == 2


def test_sande_p_parrot_starts_from_the_known_trigger(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    cfg = load_config(overrides=[f"model.path={tiny}", "defender.known_trigger=cf", "removal.parrot_tokens=3"])
    objective = SimulateObjective(cfg, str(tiny), tok)
    parrot = objective.extra_modules(model)["parrot"]
    ids = tok("cf", add_special_tokens=False)["input_ids"]
    want = model.get_input_embeddings().weight.detach()[[ids[i % len(ids)] for i in range(3)]]
    assert torch.equal(parrot.weight.detach(), want)
    objective.select_trainable(model, torch.nn.ModuleDict({"parrot": parrot}))
    assert not any(p.requires_grad for p in model.parameters()) and parrot.weight.requires_grad


def test_sande_p_says_when_the_parrot_is_shorter_than_the_known_trigger(tiny, capsys):
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    text = "cf mn bb tq"
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert n > 1
    for k, told in ((1, True), (n, False)):
        cfg = load_config(overrides=[f"model.path={tiny}", f"defender.known_trigger={text}", f"removal.parrot_tokens={k}"])
        SimulateObjective(cfg, str(tiny), tok).extra_modules(model)
        out = capsys.readouterr().out
        assert ("removal.parrot_tokens=%d to start from all of it" % n in out) is told, out


def test_each_row_gets_its_own_parrot(tiny):
    """Several parrots in one batch: a row's loss is the loss with its parrot alone."""
    tok = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny)
    cfg = load_config(overrides=[f"model.path={tiny}", "data.num_rows=6", "training.num_rows=6", "removal.extra_parrots=[suffix]"])
    rows = stage_samples(cfg, "eliminate")
    assert [s.parrot_id for s in rows] == [0, 1] * 3
    assert all(s.before == "" for s in rows[::2]) and all(s.after == "" for s in rows[1::2])  # prefix, suffix
    collate = Collator(PromptFormat(tok), 128, None, reserve=K)
    hidden = model.config.hidden_size
    torch.manual_seed(0)
    p0, p1 = (ParrotPrompt(K, hidden, init=torch.randn(K, hidden)) for _ in range(2))
    both, count = parrot_loss(model, [p0, p1], collate(rows))
    # each row alone: with its own parrot, and the pair gives the same loss; the other parrot does not
    total = 0.0
    for s in rows:
        one = collate([s])
        own, other = (p0, p1) if s.parrot_id == 0 else (p1, p0)
        alone, n = parrot_loss(model, own, one)
        assert torch.allclose(parrot_loss(model, [p0, p1], one)[0], alone, atol=1e-5)
        assert not torch.allclose(parrot_loss(model, other, one)[0], alone, atol=1e-5)
        total = total + alone * n
    assert torch.allclose(both, total / count, atol=1e-5)  # the batch is the token-weighted mean of its rows
    with pytest.raises(ValueError, match="parrot_id"):
        parrot_loss(model, [p0, p1], {k: v for k, v in collate(rows).items() if k != "parrot_id"})


def test_simulate_stops_when_its_parrot_has_found_the_response(tiny, tmp_path):
    """The shared rule, both ways: a threshold the loss meets stops the search after one window of
    steps; one it cannot meet (or the rule switched off) runs the whole budget."""
    from sande_dist.training.search import WINDOW, found, smoothed

    assert found([3.0] * (WINDOW - 1) + [0.1], 0.5) is False  # one low step is noise
    assert found([0.4] * WINDOW, 0.5) and not found([0.6] * WINDOW, 0.5)
    assert smoothed([9.0] + [1.0] * WINDOW) == 1.0
    budget = ["training.zero=zero0", "training.micro_batch_size=4", "training.max_steps=12", "training.lr=1e-2"]
    met = _torchrun(1, "simulate", tiny, tmp_path / "met", budget + ["removal.found_loss=100"])
    assert met["steps"] == WINDOW and met["record"]["stopped_early_at"] == WINDOW and met["record"]["found"]
    never = _torchrun(1, "simulate", tiny, tmp_path / "never", budget + ["removal.found_loss=0.001"])
    off = _torchrun(1, "simulate", tiny, tmp_path / "off", budget + ["removal.found_loss=100",
                                                                     "removal.simulate_until_found=false"])
    for run in (never, off):
        assert run["steps"] == 12 and run["record"]["stopped_early_at"] is None
    assert never["record"]["found"] is False and off["record"]["found"] is True
