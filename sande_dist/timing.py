"""Where a stage's wall time goes: named phases, measured from the process's own start.

A stage records its phases in ``stage.json`` (``timings``): start-up (imports,
data, model load, engine), compute, checkpoint and export I/O. The profile
benchmark (``benchmarks/pipeline_profile.py``) adds the launcher's share, which
only the executor sees (``wall_s`` in ``pipeline.json``).
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator


# When the current stage started, where one process runs several (``sande batch``); else the process's start.
_STAGE_START: list[float] = []


def stage_starts_now() -> None:
    """The next stage in this process starts now: its phases count from here, not from the process's start."""
    _STAGE_START[:] = [time.time()]


def process_start() -> float:
    """When this process's current stage started: the process's start (Linux /proc), or the last
    ``stage_starts_now``; else now."""
    if _STAGE_START:
        return _STAGE_START[0]
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class Phases:
    """Seconds per named phase; ``mark(name)`` closes the phase that ran since the last mark."""

    def __init__(self, since: float | None = None):
        self.seconds: dict[str, float] = {}
        self._last = process_start() if since is None else since

    def mark(self, name: str) -> None:
        now = time.time()
        self.add(name, now - self._last)
        self._last = now

    def mark_split(self, rest: str, parts: dict[str, float]) -> None:
        """Close the phase since the last mark as ``parts`` (measured inside it) plus ``rest``."""
        now = time.time()
        for key, seconds in parts.items():
            self.add(key, seconds)
        self.add(rest, max(0.0, now - self._last - sum(parts.values())))
        self._last = now

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 2) for k, v in self.seconds.items()}
