"""The run directory: every artifact's path, every identity, and when a stage counts as done.

```
RUN/config.yaml                      the resolved config of the last `sande run`
RUN/<stage>/stage.json               written last, atomically: the stage is done
RUN/<stage>/pipeline.json            the pipeline key the stage ran under (written before it starts)
RUN/<stage>/model/                   a Hugging Face folder (inject, osft, eliminate, sft_clean)
RUN/<stage>/parrot.safetensors       simulate
RUN/<stage>/report.json              evaluate (and generations.jsonl beside it)
RUN/<stage>/log.txt, metrics.jsonl   what the stage printed and its per-step metrics
RUN/<stage>/checkpoints/             while a training stage runs (removed when it is done)
RUN/<stage>/input_error.txt          the bad input a stage under torchrun/srun refused (exit 2)
RUN/generate/targets.jsonl           the model's own clean answers (removal.targets: self)
RUN/report.md, RUN/report.png        the summary over every evaluation
RUN/rounds.json                      SANDE's rounds: each search's verdict, why the rounds stopped
RUN/executor.json                    the local executor's process (`sande status`)
RUN/slurm/                           rendered batch scripts, job ledger, Slurm logs
```

A stage whose ``stage.json`` exists is done; its ``fingerprint`` (the config
sections it reads, its inputs' identities, and the hash of the code that makes
it) decides whether a rerun of that stage alone may skip it. The pipeline adds
its own key (``pipeline.json``): ``is_done`` needs both.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any, Optional

import sande_dist
from sande_dist.errors import InputError, read_json
from sande_dist.machine import machine
from sande_dist.registry import KINDS
from sande_dist.source import code_hash

STAGE_FILE = "stage.json"
KEY_FILE = "pipeline.json"
PARROT_FILE = "parrot.safetensors"
REPORT_FILE = "report.json"
GENERATIONS_FILE = "generations.jsonl"


# --- paths -----------------------------------------------------------------------------------------

def stage_dir(run_dir: str | Path, name: str) -> Path:
    return Path(run_dir) / name


def model_dir(run_dir: str | Path, name: str) -> Path:
    """The HF folder a model-writing stage exports."""
    return stage_dir(run_dir, name) / "model"


def parrot_file(run_dir: str | Path, name: str = "simulate") -> Path:
    return stage_dir(run_dir, name) / PARROT_FILE


def targets_file(run_dir: str | Path) -> Path:
    return stage_dir(run_dir, "generate") / "targets.jsonl"


def report_file(run_dir: str | Path, name: str) -> Path:
    return stage_dir(run_dir, name) / REPORT_FILE


def generations_file(run_dir: str | Path, name: str) -> Path:
    return stage_dir(run_dir, name) / GENERATIONS_FILE


def log_file(run_dir: str | Path, name: str) -> Path:
    return stage_dir(run_dir, name) / "log.txt"


def log_tail(path: Path, lines: int = 5) -> list[str]:
    """The last non-blank lines of a log. Ranks on several nodes write one log at once, so a line may hold
    half of another's multi-byte character: bytes that are not UTF-8 are replaced, never raised."""
    try:
        return [x for x in path.read_text(errors="replace").splitlines() if x.strip()][-lines:]
    except OSError:
        return []


def metrics_file(run_dir: str | Path, name: str) -> Path:
    return stage_dir(run_dir, name) / "metrics.jsonl"


def input_error_file(run_dir: str | Path, name: str) -> Path:
    """Where a stage under a launcher leaves the bad-input message it exits on."""
    return stage_dir(run_dir, name) / "input_error.txt"


def stopped_file(run_dir: str | Path, name: str) -> Path:
    """Where a training stage stopped by SIGTERM/SIGUSR1 records the step whose checkpoint it saved."""
    return stage_dir(run_dir, name) / "stopped.json"


def checkpoints_dir(run_dir: str | Path, name: str) -> Path:
    return stage_dir(run_dir, name) / "checkpoints"


def run_reports(run_dir: str | Path) -> tuple[Path, Path]:
    """RUN/report.md and RUN/report.png."""
    return Path(run_dir) / "report.md", Path(run_dir) / "report.png"


def rounds_file(run_dir: str | Path) -> Path:
    """SANDE's rounds: each search's verdict against the control, how many rounds ran and why they stopped."""
    return Path(run_dir) / "rounds.json"


def executor_file(run_dir: str | Path) -> Path:
    """The local executor running this run (its pid): `sande status` tells running from failed by it."""
    return Path(run_dir) / "executor.json"


def _proc_stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (the first is the state: field 3)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped) is not alive
    try:
        return _proc_stat(pid)[0] != "Z"
    except OSError:
        return True


def process_start(pid: int) -> Optional[str]:
    """When ``pid`` started (field 22, clock ticks since boot): tells the process that wrote a record from a
    later one given the same pid. None where /proc cannot say."""
    try:
        return _proc_stat(pid)[19]
    except (OSError, IndexError):
        return None


def live_executor(run_dir: str | Path) -> Optional[dict]:
    """executor.json's local executor when it is still running on this host (and is not this process)."""
    try:
        record = json.loads(executor_file(run_dir).read_text())
        pid = int(record.get("pid", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    if record.get("executor") != "local" or record.get("host") != socket.gethostname():
        return None
    if pid <= 0 or pid == os.getpid() or not pid_alive(pid):
        return None
    started = record.get("pid_start")
    if started is not None and process_start(pid) not in (None, started):
        return None  # the pid was given to another process since
    return record


def slurm_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "slurm"


# --- writing ---------------------------------------------------------------------------------------

def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name beside ``path``, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# --- identities ------------------------------------------------------------------------------------

# Config keys a re-save changes without changing the model.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache"}
# Large files are identified by this many evenly spaced samples of this many bytes.
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16
# Files up to this size are hashed whole.
_WHOLE_FILE = 64 << 20


def _hash_file(h, path: Path) -> None:
    """Feed ``path``'s identity into ``h``: its bytes when small; else its size, safetensors header
    (tensor names, shapes, dtypes, offsets) and evenly spaced samples of its bytes."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as fh:
        if size <= _WHOLE_FILE:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
            return
        start = 0
        if path.suffix == ".safetensors":
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, size)))
            start = 8 + n
        span = max(size - start - _SAMPLE_BYTES, 0)
        for i in range(_SAMPLES):
            fh.seek(start + span * i // (_SAMPLES - 1))
            h.update(fh.read(_SAMPLE_BYTES))


def weight_files(folder: Path) -> list[Path]:
    """An HF folder's weight files (safetensors preferred); InputError naming the folder when none."""
    files = sorted(Path(folder).glob("*.safetensors")) or sorted(Path(folder).glob("*.bin"))
    if not files:
        raise InputError(f"model folder {folder} has no weight files (*.safetensors or *.bin)")
    return files


def model_identity(path: str | Path) -> str:
    """The one identity of a model: stable across copies and re-saves, different after any training.

    A local HF folder: its config.json (minus keys a re-save changes) and every weight
    file (bytes when small; for large files the size, safetensors header and 16 evenly
    spaced 64 KiB samples: full fine-tuning moves every layer, and ~1 MiB per shard keeps
    a 70B folder cheap). Not a cryptographic content hash of large files. A hub id is
    its own identity. Used for skip keys, stage records and parrot/model matching.
    """
    folder = Path(path)
    if not folder.exists():
        return str(path)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise InputError(f"{folder}: no config.json (not a Hugging Face model folder)")
    config = read_json(cfg_path, "a model config")
    h = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS},
                                  sort_keys=True).encode())
    for f in weight_files(folder):
        _hash_file(h, f)
    return h.hexdigest()[:16]


def file_identity(path: str | Path) -> str:
    """The identity of a file (or of every file in a folder): content, sampled when large."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        _hash_file(h, f)
    return h.hexdigest()[:16]


def stage_code(kind: str) -> str:
    """Hash of the source that makes a ``kind`` stage's result (its modules and all they import)."""
    return code_hash(KINDS[kind].module_names)


def fingerprint(config_section: Any, inputs: Optional[dict[str, str]] = None, code: str = "") -> str:
    payload = json.dumps({"config": config_section, "inputs": inputs or {}, "code": code,
                          "version": sande_dist.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# --- done ------------------------------------------------------------------------------------------

def read_stage(stage_path: Path) -> Optional[dict]:
    """The stage record in ``stage_path``, or None (missing or unreadable: not done)."""
    path = Path(stage_path) / STAGE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def stage_done(stage_path: Path, expected_fingerprint: Optional[str] = None) -> bool:
    record = read_stage(stage_path)
    if record is None:
        return False
    return expected_fingerprint is None or record.get("fingerprint") == expected_fingerprint


def write_stage(stage_path: Path, stage: str, config_section: Any, inputs: Optional[dict[str, str]],
                started: float, code: str = "", extra: Optional[dict] = None) -> dict:
    """Record a finished stage; call this last, after every artifact is in place."""
    import torch
    import transformers

    record = {
        "stage": stage,
        "fingerprint": fingerprint(config_section, inputs, code),
        "config": config_section,
        "inputs": inputs or {},
        "code": code,
        "versions": {"sande_dist": sande_dist.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        # the process that finished the stage (a resume may have run elsewhere before it): CPU results
        # move with the thread count (sande_dist/machine.py)
        "machine": machine(),
        "wall_time_s": round(time.time() - started, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record.update(extra or {})
    atomic_write_json(Path(stage_path) / STAGE_FILE, record)
    return record


def read_key(run_dir: str | Path, name: str) -> Optional[str]:
    try:
        return json.loads((stage_dir(run_dir, name) / KEY_FILE).read_text()).get("key")
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def write_key(run_dir: str | Path, name: str, key: str, **extra: Any) -> None:
    """Record the pipeline key a stage runs under; written before it starts, so that the stage.json it
    writes last marks this key done even if the executor dies in between."""
    atomic_write_json(stage_dir(run_dir, name) / KEY_FILE, {"key": key, **extra})


def is_done(run_dir: str | Path, name: str, key: str) -> bool:
    """Done for the pipeline: ``stage.json`` exists and ``pipeline.json`` holds ``key``."""
    return read_stage(stage_dir(run_dir, name)) is not None and read_key(run_dir, name) == key


def forget(run_dir: str | Path, name: str) -> None:
    """Make a stage not done (its key changed): remove its stage.json and pipeline.json."""
    (stage_dir(run_dir, name) / STAGE_FILE).unlink(missing_ok=True)
    (stage_dir(run_dir, name) / KEY_FILE).unlink(missing_ok=True)
