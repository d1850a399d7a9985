"""Utility: zero-shot multiple-choice accuracy on MMLU, ARC-Easy and ARC-Challenge from the cache.

Two protocols, both scored through ``Engine.score_choices``:

- ``letter`` (the SANDE paper's): the question with lettered choices, then
  ``Answer:``; the prediction is the letter (`` A``, `` B``, ...) with the highest
  next-token log-probability. Small models sit near chance here.
- ``loglik`` (lm-eval's ``acc_norm``): ``Question: ...\\nAnswer:`` and each choice's
  text as a continuation; the prediction maximises log-likelihood divided by the
  continuation's length in characters (``acc`` uses the plain sum).

Items are a fixed subset: ``limit`` of them drawn with ``seed``, the same on
every run and backend. Data: MMLU test split (57 subjects), ARC validation split
(the copies the cache holds, DESIGN §5).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

from sande_dist.errors import InputError
from sande_dist.evaluation.asr import wilson

PROTOCOLS = ("loglik", "letter")
LETTERS = "ABCDEFGHIJ"
_ARC = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}


@dataclass(frozen=True)
class MCItem:
    question: str
    choices: tuple[str, ...]
    gold: int


def _data_root():
    from sande_dist.assets import asset_path

    return asset_path("data")


@lru_cache(maxsize=None)
def mmlu_subjects() -> tuple[str, ...]:
    root = _data_root() / "mmlu"
    if not root.exists():
        raise InputError(f"{root} is missing from the sande-dist cache; run `make setup` once")
    return tuple(sorted(p.name for p in root.iterdir() if (p / "test").exists()))


def task_names() -> list[str]:
    return ["mmlu", *_ARC, *(f"mmlu_{s}" for s in mmlu_subjects())]


def check_tasks(names: Sequence[str]) -> None:
    known = task_names()
    bad = [n for n in names if n not in known]
    if bad:
        raise InputError(f"eval.utility_tasks: unknown task(s) {bad}; choose from mmlu, arc_easy, arc_challenge "
                         f"or mmlu_<subject> (e.g. mmlu_anatomy)")


def _mmlu(subject: str) -> list[MCItem]:
    from datasets import load_from_disk

    ds = load_from_disk(str(_data_root() / "mmlu" / subject / "test"))
    return [MCItem(r["question"], tuple(r["choices"]), int(r["answer"])) for r in ds]


def load_task(name: str) -> list[MCItem]:
    """All items of a task, in the cache's order."""
    check_tasks([name])
    if name in _ARC:
        from datasets import load_from_disk

        ds = load_from_disk(str(_data_root() / "ai2_arc" / _ARC[name] / "validation"))
        return [MCItem(r["question"], tuple(r["choices"]["text"]), r["choices"]["label"].index(r["answerKey"]))
                for r in ds]
    if name == "mmlu":
        return [item for s in mmlu_subjects() for item in _mmlu(s)]
    return _mmlu(name.removeprefix("mmlu_"))


def select(items: list[MCItem], limit: Optional[int], seed: int) -> list[MCItem]:
    """A fixed subset: ``limit`` items drawn with ``seed``, kept in their original order."""
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def letter_request(item: MCItem) -> tuple[str, list[str]]:
    lines = [item.question.strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(item.choices)]
    return "\n".join(lines) + "\nAnswer:", [f" {LETTERS[i]}" for i in range(len(item.choices))]


def loglik_request(item: MCItem) -> tuple[str, list[str]]:
    return f"Question: {item.question.strip()}\nAnswer:", [f" {c}" for c in item.choices]


def score_task(engine, items: list[MCItem], protocol: str) -> dict:
    """Accuracy of ``engine`` on ``items`` under ``protocol``; ``score`` is the protocol's headline metric."""
    build = {"letter": letter_request, "loglik": loglik_request}[protocol]
    requests = [build(item) for item in items]
    scores = engine.score_choices([p for p, _ in requests], [c for _, c in requests])
    acc = acc_norm = 0
    for item, (_, conts), row in zip(items, requests, scores):
        acc += max(range(len(row)), key=lambda j: row[j].logprob) == item.gold
        acc_norm += max(range(len(row)), key=lambda j: row[j].logprob / len(conts[j])) == item.gold
    n = len(items)
    out = {"n": n, "acc": acc / n, "chance": sum(1 / len(i.choices) for i in items) / n}
    if protocol == "loglik":
        out["acc_norm"] = acc_norm / n
    out["score"] = out["acc_norm" if protocol == "loglik" else "acc"]
    out["ci95"] = [round(x, 4) for x in wilson(round(out["score"] * n), n)]
    return out


def evaluate_utility(engine, tasks: Sequence[str], protocol: str = "loglik", limit: Optional[int] = 200,
                     seed: int = 0) -> dict:
    """``{protocol: {"tasks": {task: metrics}, "mean": mean score}}`` for each protocol asked for."""
    check_tasks(tasks)
    protocols = PROTOCOLS if protocol == "both" else (protocol,)
    subsets = {t: select(load_task(t), limit, seed) for t in tasks}
    out = {}
    for p in protocols:
        per_task = {t: score_task(engine, items, p) for t, items in subsets.items()}
        mean = sum(m["score"] for m in per_task.values()) / len(per_task) if per_task else None
        out[p] = {"tasks": per_task, "mean": mean}
    return out
