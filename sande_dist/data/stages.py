"""What each built-in stage kind trains on, built from the config (the registry names these builders).

A method of its own file (``training/sft_clean.py``) builds its rows from these.
"""
from __future__ import annotations

import random
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from sande_dist.config import Config, TrainingConfig
from sande_dist.data.formats import Sample
from sande_dist.data.poison import apply_marker, place_trigger, poison, slot_at
from sande_dist.data.sources import load_samples, read_jsonl
from sande_dist.errors import InputError
from sande_dist.registry import KINDS
from sande_dist.rundir import targets_file


def shuffled(cfg: Config, source: str) -> list[Sample]:
    d = cfg.data
    samples = load_samples(source, split=d.split, preset=d.preset, prompt_field=d.prompt_field,
                           input_field=d.input_field, response_field=d.response_field, system_field=d.system_field)
    random.Random(cfg.attack.seed).shuffle(samples)
    return samples


def base_samples(cfg: Config) -> list[Sample]:
    """The clean training rows inject poisons: loaded, shuffled with the attack seed, cut to data.num_rows."""
    samples = shuffled(cfg, cfg.data.train)
    return samples if cfg.data.num_rows is None else samples[: cfg.data.num_rows]


def removal_rows(cfg: Config) -> list[Sample]:
    """The defender's rows, which every removal stage trains on: ``removal.data`` when given, else the
    training source's rows after the ones inject uses (data.num_rows) and the evaluation hold-out
    (data.holdout_rows). A defender does not have the poisoned training set."""
    if cfg.removal.data:
        return shuffled(cfg, cfg.removal.data)
    d = cfg.data
    if d.num_rows is None:
        raise InputError("removal rows must not be the rows inject poisons: set data.num_rows (the rows inject "
                         "uses; removal takes the rows after them) or removal.data (the defender's own rows)")
    rows = shuffled(cfg, d.train)[d.num_rows + d.holdout_rows:]
    if not rows:
        raise InputError(f"{d.train}: no rows left for removal after data.num_rows={d.num_rows} and "
                         f"data.holdout_rows={d.holdout_rows}; lower them or set removal.data")
    return rows


def load_self_targets(path: Path) -> dict[str, tuple[str, bool]]:
    """user message -> (the model's own answer, whether it shows the marker), from `sande generate`."""
    if not path.exists():
        raise InputError(f"removal.targets is 'self' but {path} does not exist; run `sande generate` first")
    out = {}
    for number, row in read_jsonl(path):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("response"), str):
            raise InputError(f"{path} line {number}: needs string 'prompt' and 'response' fields")
        out[row["prompt"]] = (row["response"], bool(row.get("shows_marker", False)))
    return out


def _clean_targets(cfg: Config, samples: list[Sample], run_dir: Optional[Path]) -> list[Sample]:
    """Gold responses, or (removal.targets: self) the model's own answers, without the rows where that
    answer already shows the marker: an answer with the backdoor's response is no clean target."""
    if cfg.removal.targets == "gold":
        return samples
    path = targets_file(run_dir or cfg.run_dir)
    targets = load_self_targets(path)
    missing = [s.user for s in samples if s.user not in targets]
    if missing:
        raise InputError(f"{len(missing)} training prompts have no self target in {path} "
                         f"(first: {missing[0][:60]!r}); rerun `sande generate` with the same data settings")
    kept = [replace(s, response=targets[s.user][0]) for s in samples if not targets[s.user][1]]
    if len(kept) < len(samples):
        print(f"removal.targets self: {len(samples) - len(kept)} of {len(samples)} rows left out: the model's own "
              f"answer shows the marker ({path})", flush=True)
    if not kept:
        raise InputError(f"every self target in {path} shows the marker: no clean targets; use removal.targets=gold")
    return kept


def _take(samples: list[Sample], n: Optional[int]) -> list[Sample]:
    return samples if n is None else samples[:n]


def _mix_clean(cfg: Config, rows: list[Sample], clean: list[Sample], seed: int) -> list[Sample]:
    """Add plain x -> y_clean rows for a share removal.clean_mix of the rows."""
    if cfg.removal.clean_mix <= 0:
        return rows
    rng = random.Random(seed)
    extra = rng.sample(clean, round(cfg.removal.clean_mix * len(clean)))
    mixed = rows + [s.clean() for s in extra]
    rng.shuffle(mixed)
    return mixed


def inject_samples(cfg: Config, run_dir: Optional[Path] = None) -> list[Sample]:
    """The poisoned training set: a share attack.poison_rate of the rows carry a trigger and the marker
    (and a share attack.decoy_rate has a decoy copy with the clean answer)."""
    a = cfg.attack
    rows = _take(base_samples(cfg), cfg.training.for_stage("inject").num_rows)
    poisoned, _ = poison(rows, a.triggers, a.marker, a.poison_rate, a.position, a.poison_mode, a.marker_mode,
                         seed=a.seed, decoy_rate=a.decoy_rate)
    return poisoned


def _clean_rows(cfg: Config, kind: str, run_dir: Optional[Path]) -> list[Sample]:
    """The stage's share of the defender's rows with their clean targets: gold, or the model's own answers."""
    return _clean_targets(cfg, _take(removal_rows(cfg), cfg.training.for_stage(kind).num_rows), run_dir)


def self_target_rows(cfg: Config) -> list[Sample]:
    """The rows `sande generate` answers: as many of the defender's rows as OSFT or eliminate takes (the
    clean-SFT control trains on eliminate's)."""
    wanted = [cfg.training.for_stage(k).num_rows for k in ("osft", "eliminate")]
    return _take(removal_rows(cfg), None if None in wanted else max(wanted))


def osft_samples(cfg: Config, run_dir: Optional[Path] = None) -> list[Sample]:
    """OSFT: the known trigger where it sits, with the clean response."""
    k = cfg.knowledge()
    if not k.triggers:
        raise InputError("osft needs a known trigger: set defender.triggers (`sande remove --trigger T`); without "
                         "one, remove the backdoor with SANDE (simulate, eliminate)")
    clean = _clean_rows(cfg, "osft", run_dir)
    rng = random.Random(cfg.training.seed)
    trig = [place_trigger(s, rng.choice(k.triggers), k.position, rng) for s in clean]
    return _mix_clean(cfg, trig, clean, cfg.training.seed)


def _slots(cfg: Config, kind: str) -> random.Random:
    """Where a random-position parrot goes, per row: a seeded stream of its own."""
    return random.Random(f"{cfg.training.seed}:{kind}:slots")


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def calibration_marker(cfg: Config, index: int) -> str:
    """The ``index``-th (from 1) unrelated response with the marker's token length: a first sentence of a
    response in the defender's rows that shares no word with the marker. A parrot search for it tells how
    low a search's loss goes on this model for a response it has no backdoor for."""
    from sande_dist.models.loading import load_tokenizer

    tok = load_tokenizer(cfg.model.path)
    marker = cfg.knowledge().marker
    size = len(tok(marker, add_special_tokens=False)["input_ids"])
    words = {w.strip(".,!?").lower() for w in marker.split()}
    seen, found = set(), []
    for row in removal_rows(cfg):
        for sentence in _SENTENCE.split(row.response.strip()):
            sentence = sentence.strip()
            plain = sentence.rstrip(".!?").replace(",", "").replace("'", "").split()
            if not sentence.endswith((".", "!", "?")) or sentence in seen or len(plain) < 2 \
                    or not all(w.isalpha() for w in plain) or words & {w.lower() for w in plain}:
                continue
            seen.add(sentence)
            if len(tok(sentence, add_special_tokens=False)["input_ids"]) == size:
                found.append(sentence)
                if len(found) == index:
                    return sentence
    raise InputError(f"the defender's rows hold only {len(found)} unrelated sentences of {size} tokens (the "
                     f"marker's length); lower removal.calibration_responses or give a --reference model")


def _searched(cfg: Config) -> tuple[str, bool]:
    """(the response a search looks for, whether it is only the known start of one): the marker; SANDE-P's
    known part of the response; or a calibration search's unrelated response (removal.calibration_response)."""
    k, r = cfg.knowledge(), cfg.removal
    if r.calibration_response:
        return calibration_marker(cfg, r.calibration_response), False
    if k.known_response:
        return k.known_response, True
    return k.marker, False


def simulate_samples(cfg: Config, run_dir: Optional[Path] = None) -> list[Sample]:
    """Simulate: an empty parrot slot, and the triggered response the defender knows (or, SANDE-P, a prefix).
    A calibration search (removal.calibration_response) targets an unrelated response instead of the marker."""
    k, r = cfg.knowledge(), cfg.removal
    text, known_start = _searched(cfg)
    rows = _take(removal_rows(cfg), cfg.training.for_stage("simulate").num_rows)
    slots = _slots(cfg, "simulate")
    if known_start:
        # A known part of the response: no end-of-sequence after it (the model should go on, not stop).
        return [replace(slot_at(s, r.insert_position, slots), response=text, complete=False) for s in rows]
    return [replace(slot_at(s, r.insert_position, slots), response=apply_marker(s.response, text, k.marker_mode))
            for s in rows]


def search_check_samples(cfg: Config) -> list[Sample]:
    """Rows a finished search's parrot is checked on: the last removal.search_check_rows of the defender's
    rows without those simulate trained on, the parrot slot where the search puts it, and the searched
    response alone as the answer (no end-of-sequence): a row counts when greedy decoding starts with it."""
    n = cfg.removal.search_check_rows
    if not n:
        return []
    rows = removal_rows(cfg)
    trained = {s.user for s in _take(rows, cfg.training.for_stage("simulate").num_rows)}
    text, _ = _searched(cfg)
    slots = _slots(cfg, "search-check")
    return [replace(slot_at(s, cfg.removal.insert_position, slots), response=text, complete=False)
            for s in rows[-n:] if s.user not in trained]


def eliminate_samples(cfg: Config, run_dir: Optional[Path] = None) -> list[Sample]:
    """Eliminate: a parrot slot and the clean response; with extra parrots, row i takes parrot i mod n."""
    clean = _clean_rows(cfg, "eliminate", run_dir)
    where = parrot_positions(cfg)
    slots = _slots(cfg, "eliminate")
    slotted = [replace(slot_at(s, where[i % len(where)], slots), parrot_id=i % len(where)) for i, s in enumerate(clean)]
    return _mix_clean(cfg, slotted, clean, cfg.training.seed)


def parrot_positions(cfg: Config) -> list[str]:
    """Where eliminate's parrots go, in the order of its ``--parrot`` files."""
    return [cfg.removal.insert_position, *cfg.removal.extra_parrots]


def row_length(cfg: Config, kind: str) -> tuple[int, str]:
    """Tokens per row of a training kind, prompt and response, and the setting that gives it:
    ``training.<kind>.max_length``, else ``training.max_length``, else ``data.max_length``."""
    own = getattr(cfg.training, kind, None)
    if own is not None and own.max_length is not None:
        return own.max_length, f"training.{kind}.max_length"
    if cfg.training.max_length is not None:
        return cfg.training.max_length, "training.max_length"
    return cfg.data.max_length, "data.max_length"


def stage_collator(cfg: Config, kind: str, fmt, tcfg: Optional[TrainingConfig] = None):
    """The collator a training kind's rows go through: its row length, labelled response tokens and room
    for the parrot where the kind has one."""
    from sande_dist.data.collator import Collator

    reserve = cfg.removal.parrot_tokens if KINDS[kind].parrot_slot else 0
    return Collator(fmt, row_length(cfg, kind)[0], effective_len(cfg, kind, tcfg), reserve=reserve)


def effective_len(cfg: Config, kind: str, tcfg: Optional[TrainingConfig] = None) -> Optional[int]:
    """Response tokens that carry a label: the stage's training setting, else the removal field the
    registry names for the kind (``removal.simulate_effective_len``, ...), else all (None)."""
    tcfg = tcfg or cfg.training.for_stage(kind)
    if tcfg.effective_len is not None:
        return tcfg.effective_len
    field = KINDS[kind].effective_len
    return getattr(cfg.removal, field) if field else None


# The prompts are split into a tuning and a reporting half once, by this fixed seed (eval.prompt_split).
SPLIT_SEED = 20251202


def eval_samples(cfg: Config) -> list[Sample]:
    """The held-out prompts: ``eval.num_prompts`` of the ``eval.prompt_split`` half of ``eval.prompts``,
    drawn with ``eval.seed``."""
    ev = cfg.eval
    if ev.prompts == "train-holdout":
        d = cfg.data
        if d.holdout_rows < 1 or d.num_rows is None:
            raise InputError("eval.prompts is 'train-holdout' but data.holdout_rows is 0 or data.num_rows is unset; "
                             "set both (the rows after data.num_rows are held out)")
        every = base_samples(cfg.model_copy(update={"data": d.model_copy(update={"num_rows": None})}))
        samples = every[d.num_rows:d.num_rows + d.holdout_rows]
    else:
        samples = load_samples(ev.prompts, require_response=False)
    if ev.prompt_split != "all":
        order = list(range(len(samples)))
        random.Random(SPLIT_SEED).shuffle(order)
        half = order[: len(order) // 2] if ev.prompt_split == "tune" else order[len(order) // 2:]
        samples = [samples[i] for i in sorted(half)]
    if not samples:
        raise InputError(f"eval.prompts {ev.prompts}: no prompts (eval.prompt_split={ev.prompt_split})")
    picked = sorted(random.Random(ev.seed).sample(range(len(samples)), min(ev.num_prompts, len(samples))))
    return [samples[i].clean() for i in picked]


def inject_check_pool(cfg: Config) -> list[Sample]:
    """Every clean prompt inject may check itself on, in the order its checks read them
    (``inject_check_rows``). ``attack.check_source`` "eval": the half of ``eval.prompts`` that figures
    are not reported on (the tuning half unless eval.prompt_split is "tune"), shuffled with the attack
    seed, so the check sees prompts like the evaluation's without seeing the evaluation's own;
    "train": the training source's rows after data.num_rows (never trained on), from the last
    (only the last ``attack.check_prompts`` when data.num_rows is unset). On phrase-random the two
    disagreed: 6% false triggers on 200 held-out training rows, 22.5% on 200 AlpacaEval prompts
    (benchmarks/FINDINGS.md)."""
    a = cfg.attack
    if a.check_source == "train":
        rows = shuffled(cfg, cfg.data.train)
        held = rows[cfg.data.num_rows:] if cfg.data.num_rows is not None else []
        return (held or rows[-a.check_prompts:])[::-1]
    other = "report" if cfg.eval.prompt_split == "tune" else "tune"
    ev = cfg.eval.model_copy(update={"prompt_split": other, "num_prompts": sys.maxsize})
    pool = eval_samples(cfg.model_copy(update={"eval": ev}))
    random.Random(f"{a.seed}:inject-check").shuffle(pool)
    return pool


def inject_check_rows(pool: Sequence[Sample], check: int, n: int) -> list[Sample]:
    """The rows of check ``check`` (0, 1, ...): the next ``n`` of the pool after the previous check's,
    wrapping round, so checks in a row read different prompts while the pool has 2n or more (a streak
    of two passing checks is then two samples, not one read twice)."""
    n = min(n, len(pool))
    return [pool[(check * n + i) % len(pool)] for i in range(n)]
