"""What a running stage is doing, from its own files: step x of y, loss, and an ETA.

The executor reads a stage's ``metrics.jsonl`` (written by rank 0 each step) and shows
one live line on a terminal; elsewhere (logs, CI) it prints a plain line at most
once a minute. The stage's full output stays in ``RUN/<stage>/log.txt``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from sande_dist.rundir import metrics_file


def stage_progress(run_dir: str | Path, name: str) -> Optional[dict]:
    """{step, of, loss, eta_s} from the stage's last metrics lines; None before its first step."""
    path = metrics_file(run_dir, name)
    try:
        lines = path.read_text().splitlines()[-8:]
        rows = [json.loads(line) for line in lines if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    if not rows or "of" not in rows[-1]:
        return None
    last = rows[-1]
    per_step = sum(r["step_time_s"] for r in rows) / len(rows)
    return {"step": last["step"], "of": last["of"], "loss": last["loss"],
            "eta_s": max(0.0, (last["of"] - last["step"]) * per_step)}


def describe(started: float, progress: Optional[dict]) -> str:
    elapsed = time.time() - started
    if progress is None:
        return f"running, {elapsed:.0f}s"
    return (f"step {progress['step']}/{progress['of']}, loss {progress['loss']:.3f}, {elapsed:.0f}s, "
            f"ETA {progress['eta_s']:.0f}s")


class LiveLine:
    """One line rewritten in place on a terminal; plain lines, at most every ``every`` s, elsewhere."""

    def __init__(self, echo: Callable[[str], None] = print, tty: Optional[bool] = None, every: float = 60.0):
        self.echo = echo
        self.tty = sys.stdout.isatty() if tty is None else tty
        self.every = every
        self._last = 0.0
        self._shown = False

    def update(self, text: str) -> None:
        if self.tty:
            sys.stdout.write("\r\033[K" + text)
            sys.stdout.flush()
            self._shown = True
        elif time.time() - self._last >= self.every:
            self.echo(text)
            self._last = time.time()

    def clear(self) -> None:
        """Before a plain line is printed: the live line goes."""
        if self.tty and self._shown:
            sys.stdout.write("\r\033[K")
            sys.stdout.flush()
            self._shown = False
