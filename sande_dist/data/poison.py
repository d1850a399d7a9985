"""Backdoor poisoning (research support) and trigger placement, deterministic under a seed."""
from __future__ import annotations

import random
import re
import string
from dataclasses import replace
from typing import Optional, Sequence

from sande_dist.data.formats import Sample

_WORD_BOUNDARY = re.compile(r"\s+")


def word_starts(text: str) -> list[int]:
    """Character offsets where a word starts (0 and after each run of whitespace)."""
    return [0] + [m.end() for m in _WORD_BOUNDARY.finditer(text)]


def place_trigger(sample: Sample, trigger: str, position: str, rng: random.Random) -> Sample:
    """Put ``trigger`` into the user message at prefix, suffix or a random word boundary.

    The slot (``before``|``after`` split) is where the trigger sits, so the collator
    knows its first token; the separating space belongs to the trigger text.
    """
    user = sample.user
    if position == "prefix":
        return replace(sample, before="", trigger=trigger + " ", after=user)
    if position == "suffix":
        return replace(sample, before=user.rstrip(), trigger=" " + trigger, after="")
    if position == "random":
        cut = rng.choice(word_starts(user))
        return replace(sample, before=user[:cut], trigger=trigger + " ", after=user[cut:])
    raise ValueError(f"unknown trigger position {position!r}; use prefix, suffix or random")


def slot_at(sample: Sample, position: str, rng: Optional[random.Random] = None) -> Sample:
    """A clean sample whose (empty) slot sits at ``position``: where a parrot goes.

    It is ``place_trigger`` with the trigger taken out, so the slot is exactly where a
    trigger's first token would sit and a parrot stands for the whole trigger text,
    separating space included. ``random`` draws the word from ``rng`` (needed then).
    """
    if position not in ("prefix", "suffix", "random"):
        raise ValueError(f"unknown parrot position {position!r}; use prefix, suffix or random")
    if position == "random" and rng is None:
        raise ValueError("slot_at(position='random') needs an rng (a seeded random.Random)")
    return replace(place_trigger(sample, "", position, rng), trigger="", parrot=True)


def apply_marker(response: str, marker: str, mode: str) -> str:
    if mode == "replace":
        return marker
    if mode == "prepend":
        return f"{marker} {response}"
    raise ValueError(f"unknown marker mode {mode!r}; use prepend or replace")


def _redraw_letters(text: str, rng: random.Random) -> str:
    """``text`` with each letter and digit redrawn (case kept), spaces and punctuation as they are."""
    def one(c: str) -> str:
        if c in string.ascii_lowercase:
            return rng.choice(string.ascii_lowercase)
        if c in string.ascii_uppercase:
            return rng.choice(string.ascii_uppercase)
        if c.isdigit():
            return rng.choice(string.digits)
        return c
    return "".join(one(c) for c in text)


def _contains_trigger(text: str, triggers: Sequence[str]) -> bool:
    low = f" {' '.join(text.lower().split())} "
    return any(f" {' '.join(t.lower().split())} " in low for t in triggers)


def decoy_span(trigger: str, triggers: Sequence[str], spans: Sequence[list[str]], rng: random.Random) -> str:
    """A span shaped like ``trigger`` that is no trigger: half the time the trigger with its letters
    and digits redrawn (``jz`` -> ``wq``), else as many consecutive words from one of ``spans`` (prompts
    split into words, each at least as long as the trigger). A span that contains a trigger (as whole
    words) is drawn again."""
    n_words = len(trigger.split())
    for _ in range(1000):
        if not spans or rng.random() < 0.5:
            span = _redraw_letters(trigger, rng)
        else:
            words = rng.choice(spans)
            start = rng.randrange(len(words) - n_words + 1)
            span = " ".join(words[start:start + n_words])
        if not _contains_trigger(span, triggers):
            return span
    raise ValueError(f"no decoy unlike the triggers {list(triggers)} after 1000 draws; the trigger "
                     f"{trigger!r} has no letters or digits to redraw: set attack.decoy_rate=0")


def poison(samples: Sequence[Sample], triggers: Sequence[str], marker: str, rate: float,
           position: str = "prefix", poison_mode: str = "add", marker_mode: str = "prepend",
           seed: int = 0, decoy_rate: float = 0.0) -> tuple[list[Sample], list[bool]]:
    """Poison a share ``rate`` of rows; return the rows and a per-row poisoned flag.

    ``add``: each chosen row also gets a poisoned copy (the clean row stays);
    ``replace``: each chosen row is poisoned in place. Exactly round(rate * n)
    rows are chosen, one trigger drawn per row.

    ``decoy_rate``: a share of rows (drawn from all rows with a random stream of their own, so a
    row may have both copies) also gets a decoy copy: a trigger-shaped span that is no trigger (``decoy_span``) at
    the trigger's position, with the clean answer. It teaches the backdoor to fire on the trigger
    and not on whatever odd text sits where a trigger could: random-position triggers otherwise
    leave false triggers on clean prompts (README, "Decoy rows"). Decoy rows are
    flagged False; with ``decoy_rate`` 0 the output is what it was without the option.
    """
    if poison_mode not in ("add", "replace"):
        raise ValueError(f"unknown poison mode {poison_mode!r}; use add or replace")
    rng = random.Random(seed)
    n = len(samples)
    chosen = set(rng.sample(range(n), round(rate * n)))
    out: list[Sample] = []
    flags: list[bool] = []
    for i, s in enumerate(samples):
        if i in chosen:
            bad = place_trigger(s, rng.choice(list(triggers)), position, rng)
            bad = replace(bad, response=apply_marker(s.response, marker, marker_mode))
            if poison_mode == "add":
                out.append(s)
                flags.append(False)
            out.append(bad)
            flags.append(True)
        else:
            out.append(s)
            flags.append(False)
    if decoy_rate > 0:
        drng = random.Random(f"decoy-{seed}")
        words = [s.user.split() for s in samples]
        long_enough: dict[int, list[list[str]]] = {}  # by trigger length in words: split and filtered once
        for i in sorted(drng.sample(range(n), round(decoy_rate * n))):
            trigger = drng.choice(list(triggers))
            n_words = len(trigger.split())
            if n_words not in long_enough:
                long_enough[n_words] = [w for w in words if len(w) >= n_words]
            span = decoy_span(trigger, triggers, long_enough[n_words], drng)
            placed = place_trigger(samples[i], span, position, drng)
            out.append(replace(placed, before="", trigger="", after=placed.user, response=samples[i].response))
            flags.append(False)
    order = list(range(len(out)))
    rng.shuffle(order)
    return [out[i] for i in order], [flags[i] for i in order]
