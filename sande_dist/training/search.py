"""When a parrot search has found a backdoor: one rule for simulate's early stop, the residual
search after removal, `removal.rounds: auto` and `sande scan`.

A parrot has *found* the response when its training loss (mean cross-entropy per labelled token,
the first ``removal.simulate_effective_len`` tokens of the response), averaged over the last
``WINDOW`` steps, is at most ``removal.found_loss``. The default 0.5 nats means every labelled
token has, on average, probability >= e^-0.5 = 0.61: the model all but emits the response. On the
demo's SmolLM2 a backdoored model's parrot reaches 0.14-0.4 while the clean base model's, searched
the same way, stays above 1.4 (README, "Read the control first").
"""
from __future__ import annotations

from typing import Sequence

# Steps the loss is averaged over: a parrot's per-step loss is noisy (one micro-batch of rows).
WINDOW = 8


def smoothed(losses: Sequence[float], window: int = WINDOW) -> float:
    """Mean of the last ``window`` losses (of all of them when fewer)."""
    tail = list(losses)[-window:]
    return sum(tail) / len(tail) if tail else float("inf")


def found(losses: Sequence[float], threshold: float, window: int = WINDOW) -> bool:
    """True when a full window of steps has run and its mean loss is at most ``threshold``."""
    return len(losses) >= window and smoothed(losses, window) <= threshold
