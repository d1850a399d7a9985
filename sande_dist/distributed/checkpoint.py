"""Checkpoints that are either complete or ignored: temp name, manifest, rename, rotation.

A checkpoint is written by every rank into ``.tmp-step-N``; rank 0 then writes a
manifest (every file with its size) and renames the folder to ``step-N``. On
resume, the newest ``step-*`` whose manifest matches the files on disk is used;
a half-written (temp, no manifest) or damaged (missing/short file) one is skipped
with a warning, so the previous complete checkpoint is used instead.
Ranks must share the filesystem (as DeepSpeed's own checkpointing assumes).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from sande_dist.errors import InputError
from sande_dist.rundir import atomic_write_json

MANIFEST = "COMPLETE.json"
# The fingerprint of the stage that wrote the checkpoints: another one never resumes them.
FINGERPRINT_FILE = "FINGERPRINT"
STATE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _files(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def check_complete(folder: Path) -> Optional[str]:
    """None when ``folder`` is a complete checkpoint, else what is wrong with it."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (half-written)"
    try:
        expected = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError):
        return "unreadable manifest"
    for name, size in expected.items():
        f = folder / name
        if not f.is_file():
            return f"missing {name}"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, manifest says {size}"
    return None


def newest_complete(root: Path) -> Optional[Path]:
    """The newest complete ``step-*`` checkpoint under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    found = sorted((p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)), reverse=True)
    return next((p for p in found if check_complete(p) is None), None)


def check_resume(root: Path, world_size: int, zero_stage: int, fingerprint: str) -> None:
    """InputError when the checkpoint a stage would resume from cannot load into ``world_size`` ranks.

    ZeRO-1/2/3 checkpoints hold each rank's partition of the optimizer states (and, ZeRO-3, of the
    weights); DeepSpeed cannot load them into another rank count. A resume must never quietly
    start over, so this is checked before a process group exists: the message names the
    checkpoint, both rank counts and the ways out. Checkpoints of another fingerprint (another
    config or input) are not resumed at all, so they are not checked.
    """
    marker = Path(root) / FINGERPRINT_FILE
    if not marker.is_file() or marker.read_text().strip() != fingerprint:
        return
    path = newest_complete(root)
    if path is None or zero_stage < 1:
        return
    try:
        written = json.loads((path / STATE).read_text()).get("world_size")
    except (OSError, json.JSONDecodeError):
        return
    if written is not None and written != world_size:
        raise InputError(
            f"checkpoint {path} was written by {written} ranks, but this run has {world_size}: a ZeRO-{zero_stage} "
            f"checkpoint holds one partition per rank. Resume with {written} ranks (--nproc, or slurm.nodes x "
            "slurm.gpus_per_node), or convert it with DeepSpeed's universal checkpoint tool "
            f"(python -m deepspeed.checkpoint.ds_to_universal --input_folder {path} ...) and load that, or start "
            "the stage over with --no-resume")


class CheckpointManager:
    def __init__(self, root: Path, rank: int, keep: int, log: Callable[[str], None] = print):
        self.root = Path(root)
        self.rank = rank
        self.keep = keep
        self.log = log
        self.bytes_written = 0  # rank 0: every rank's files of every checkpoint saved here

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def candidates(self) -> list[Path]:
        """``step-*`` folders, newest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def complete(self, warn: bool = False) -> list[Path]:
        out = []
        for path in self.candidates():
            problem = check_complete(path)
            if problem is None:
                out.append(path)
            elif warn and self.rank == 0:
                self.log(f"checkpoint {path} is not usable ({problem}); skipping it")
        return out

    def save(self, engine, step: int, state: dict[str, Any]) -> Path:
        """Every rank calls this at the same step; returns the final folder."""
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        # Frozen weights (a simulate stage's whole model) come from the stage's input model, not from here.
        frozen = sum(1 for p in engine.module.parameters() if not p.requires_grad)
        engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False, exclude_frozen_parameters=frozen > 0)
        torch.save(rng_state(), tmp / f"rng_rank{self.rank:05d}.pt")
        self._barrier()
        if self.rank == 0:
            atomic_write_json(tmp / STATE, {**state, "step": step, "frozen_excluded": frozen})
            files = _files(tmp)
            self.bytes_written += sum(files.values())
            atomic_write_json(tmp / MANIFEST, {"step": step, "files": files})
            if final.exists():  # a damaged checkpoint of the same step, from an earlier attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate()
        self._barrier()
        return final

    def _rotate(self) -> None:
        keep = self.complete()[: self.keep]
        newest = keep[0].name if keep else ""
        for path in self.candidates():
            # Older complete ones beyond `keep`, and damaged ones older than the newest complete one.
            if path not in keep and path.name < newest:
                shutil.rmtree(path, ignore_errors=True)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def load_latest(self, engine, world_size: int) -> Optional[dict]:
        """Load the newest complete checkpoint into ``engine``; its trainer state, or None if none."""
        for path in self.complete(warn=True):
            ok = True
            try:
                state = json.loads((path / STATE).read_text())
                engine.load_checkpoint(str(self.root), tag=path.name, load_optimizer_states=True,
                                       load_lr_scheduler_states=True,
                                       load_module_strict=not state.get("frozen_excluded", 0))
            except Exception as exc:  # damaged contents that sizes cannot show
                self.log(f"checkpoint {path} failed to load ({type(exc).__name__}: {exc}); trying an older one")
                ok = False
            flag = torch.tensor([0 if ok else 1], device=engine.device if torch.cuda.is_available() else "cpu")
            if dist.is_initialized():
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                continue
            rng_file = path / f"rng_rank{self.rank:05d}.pt"
            if state.get("world_size") == world_size and rng_file.is_file():
                set_rng_state(torch.load(rng_file, weights_only=False))
            elif self.rank == 0:
                self.log(f"checkpoint {path} was written by {state.get('world_size')} ranks, now {world_size}: "
                         "RNG states not restored")
            return state
        return None
