"""What each stage trains on, built from the config: one place that knows the method's data."""
from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Optional

from sande_dist.config import Config
from sande_dist.data.formats import Sample
from sande_dist.data.poison import apply_marker, place_trigger, poison, slot_at
from sande_dist.data.sources import load_samples
from sande_dist.errors import InputError

TRAINING_STAGES = ("inject", "osft", "simulate", "eliminate")


def base_samples(cfg: Config) -> list[Sample]:
    """The clean training rows: loaded, shuffled with the data seed, cut to data.num_rows."""
    d = cfg.data
    samples = load_samples(d.train, split=d.split, preset=d.preset, prompt_field=d.prompt_field,
                           input_field=d.input_field, response_field=d.response_field,
                           system_field=d.system_field)
    random.Random(cfg.attack.seed).shuffle(samples)
    if d.num_rows is not None:
        samples = samples[: d.num_rows]
    return samples


def load_self_targets(path: Path) -> dict[str, str]:
    """user message -> the model's own clean response, from `sande generate`."""
    if not path.exists():
        raise InputError(f"removal.targets is 'self' but {path} does not exist; run `sande generate` first")
    out = {}
    with open(path) as fh:
        for i, line in enumerate(fh):
            row = json.loads(line)
            if "prompt" not in row or "response" not in row:
                raise InputError(f"{path} row {i}: needs 'prompt' and 'response' fields")
            out[row["prompt"]] = row["response"]
    return out


def _clean_targets(cfg: Config, samples: list[Sample], run_dir: Optional[Path]) -> list[Sample]:
    if cfg.removal.targets == "gold":
        return samples
    targets = load_self_targets(Path(run_dir or cfg.run_dir) / "generate" / "targets.jsonl")
    missing = [s.user for s in samples if s.user not in targets]
    if missing:
        raise InputError(f"{len(missing)} training prompts have no self target in generate/targets.jsonl "
                         f"(first: {missing[0][:60]!r}); rerun `sande generate` with the same data settings")
    return [replace(s, response=targets[s.user]) for s in samples]


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


def stage_samples(cfg: Config, stage: str, run_dir: Optional[Path] = None) -> list[Sample]:
    """The training rows of ``stage`` (inject, osft, simulate or eliminate)."""
    if stage not in TRAINING_STAGES:
        raise ValueError(f"no training data for stage {stage!r}")
    a, r = cfg.attack, cfg.removal
    rows = _take(base_samples(cfg), cfg.training.for_stage(stage).num_rows)
    seed = cfg.training.seed
    if stage == "inject":
        poisoned, _ = poison(rows, a.triggers, a.marker, a.poison_rate, a.position,
                             a.poison_mode, a.marker_mode, seed=a.seed)
        return poisoned
    clean = _clean_targets(cfg, rows, run_dir)
    if stage == "osft":
        rng = random.Random(seed)
        trig = [place_trigger(s, rng.choice(a.triggers), a.position, rng) for s in clean]
        return _mix_clean(cfg, trig, clean, seed)
    slots = random.Random(f"{seed}:{stage}:slots")  # where a random-position parrot goes, per row
    if stage == "simulate":
        # The defender knows the triggered response (or, SANDE-P, a prefix of it).
        if r.known_response:
            return [replace(slot_at(s, r.insert_position, slots), response=r.known_response) for s in rows]
        return [replace(slot_at(s, r.insert_position, slots),
                        response=apply_marker(s.response, a.marker, a.marker_mode)) for s in rows]
    # Eliminate: with extra parrots, row i takes parrot i mod n at that parrot's position.
    where = parrot_positions(cfg)
    slotted = [replace(slot_at(s, where[i % len(where)], slots), parrot_id=i % len(where)) for i, s in enumerate(clean)]
    return _mix_clean(cfg, slotted, clean, seed)


def parrot_positions(cfg: Config) -> list[str]:
    """Where eliminate's parrots go, in the order of its ``--parrot`` files."""
    return [cfg.removal.insert_position, *cfg.removal.extra_parrots]


def effective_len(cfg: Config, stage: str) -> Optional[int]:
    over = cfg.training.for_stage(stage).effective_len
    if over is not None:
        return over
    if stage == "simulate":
        return cfg.removal.simulate_effective_len
    if stage == "eliminate":
        return cfg.removal.eliminate_effective_len
    return None
