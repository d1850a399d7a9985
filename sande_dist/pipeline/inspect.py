"""`sande data CONFIG --stage STAGE --rows N [--json]`: what a stage's rows look like as tokens.

Each row as the stage sees it: the rendered text (prompt, the template's reply
prefix, the response), its token ids and tokens, which tokens carry a label, and
the slot (where the trigger's first token sits, or where a parrot is spliced).
The ids come from the same code the stage runs, so this is the check a user makes
before a long run: the prompt reads right, the slot sits on the trigger, only the
response is labelled.
"""
from __future__ import annotations

import json
import random
from typing import Optional

from sande_dist.config import Config
from sande_dist.data.collator import IGNORE_INDEX, Collator
from sande_dist.data.formats import PromptFormat, Sample
from sande_dist.data.poison import place_trigger
from sande_dist.data.stages import stage_collator
from sande_dist.errors import InputError
from sande_dist.models.loading import check_model, load_tokenizer
from sande_dist.registry import TRAINING_KINDS
from sande_dist.training.stages import stage_samples, stage_training

STAGES = (*TRAINING_KINDS, "evaluate")


def _row(fmt: PromptFormat, collator: Optional[Collator], sample: Sample, index: int) -> dict:
    tok = fmt.tokenizer
    if collator is None:  # an evaluation prompt: no reply, no labels
        ids, slot = fmt.encode_prompt(sample)
        labels, text = [IGNORE_INDEX] * len(ids), fmt.render(sample)
    else:
        enc = collator.encode(sample)
        ids, labels, slot = enc.input_ids, enc.labels, enc.slot
        text = fmt.render(sample) + fmt.reply(sample)
    return {"row": index, "text": text, "input_ids": ids, "tokens": tok.convert_ids_to_tokens(ids),
            "labels": labels, "slot": slot, "trigger": sample.trigger, "parrot": sample.parrot,
            "parrot_id": sample.parrot_id}


def data_rows(cfg: Config, stage: str, rows: int = 3) -> list[dict]:
    """The first ``rows`` rows of ``stage`` (a training kind, or ``evaluate``'s triggered prompts). The ids
    are those the stage trains on: with an ``effective_len`` they end after the last label; ``text`` is
    the whole row."""
    if stage not in STAGES:
        raise InputError(f"--stage {stage!r}: choose from {', '.join(STAGES)}")
    fmt = PromptFormat.from_config(load_tokenizer(check_model(cfg.model.path, cfg.model.base)), cfg.data)
    if stage == "evaluate":
        from sande_dist.data.stages import eval_samples

        rng, known = random.Random(cfg.eval.seed), cfg.knowledge()
        samples = [place_trigger(s, rng.choice(known.triggers), known.position, rng) if known.triggers else s
                   for s in eval_samples(cfg)]
        return [_row(fmt, None, s, i) for i, s in enumerate(samples[:rows])]
    collator = stage_collator(cfg, stage, fmt, stage_training(cfg, stage))
    samples = [s for s in stage_samples(cfg, stage) if collator.fits(s)]
    return [_row(fmt, collator, s, i) for i, s in enumerate(samples[:rows])]


def format_row(row: dict) -> str:
    """One row for a terminal: the text, then one line per token (index, id, token, label, slot)."""
    lines = [f"row {row['row']}: {sum(l != IGNORE_INDEX for l in row['labels'])} labelled tokens, slot {row['slot']}"
             + (f" (trigger {row['trigger']!r})" if row["trigger"] else "") + (" (parrot here)" if row["parrot"] else ""),
             f"text: {row['text']!r}"]
    for i, (tid, token, label) in enumerate(zip(row["input_ids"], row["tokens"], row["labels"])):
        mark = "L" if label != IGNORE_INDEX else " "
        lines.append(f"  {i:>4} {tid:>7} {mark} {token!r}" + ("   <- slot" if i == row["slot"] else ""))
    return "\n".join(lines)


def show(cfg: Config, stage: str, rows: int, as_json: bool) -> int:
    for row in data_rows(cfg, stage, rows):
        print(json.dumps(row) if as_json else format_row(row) + "\n")
    return 0
