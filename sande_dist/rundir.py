"""The run directory contract: RUN/<stage>/ with stage.json written last, atomically.

A stage whose stage.json exists is done; its ``fingerprint`` (config + inputs'
fingerprints + code version) decides whether a rerun may skip it.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Optional

import sande_dist

STAGE_FILE = "stage.json"


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


def fingerprint_path(path: Path) -> str:
    """Content fingerprint of a file or folder: sizes and mtimes for big files, bytes for small ones."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        h.update(str(f.relative_to(path) if f != path else f.name).encode())
        if st.st_size <= 1 << 20:
            h.update(f.read_bytes())
        else:
            h.update(f"{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def fingerprint(config_section: Any, inputs: Optional[dict[str, str]] = None) -> str:
    payload = json.dumps({"config": config_section, "inputs": inputs or {}, "code": sande_dist.__version__},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def stage_done(stage_dir: Path, expected_fingerprint: Optional[str] = None) -> bool:
    record = read_stage(stage_dir)
    if record is None:
        return False
    return expected_fingerprint is None or record.get("fingerprint") == expected_fingerprint


def read_stage(stage_dir: Path) -> Optional[dict]:
    path = Path(stage_dir) / STAGE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def write_stage(stage_dir: Path, stage: str, config_section: Any, inputs: Optional[dict[str, str]],
                started: float, extra: Optional[dict] = None) -> dict:
    """Record a finished stage; call this last, after every artifact is in place."""
    import torch
    import transformers

    record = {
        "stage": stage,
        "fingerprint": fingerprint(config_section, inputs),
        "config": config_section,
        "inputs": inputs or {},
        "versions": {"sande_dist": sande_dist.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "wall_time_s": round(time.time() - started, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    record.update(extra or {})
    atomic_write_json(Path(stage_dir) / STAGE_FILE, record)
    return record
