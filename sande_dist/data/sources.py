"""Load instruction data from a named embedded set, a local file or a hub id, into clean Samples.

Field presets map each source's columns to (user message, response, system);
a malformed row is an error naming the file, the row and the field.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator, Optional

from sande_dist.data.formats import Sample
from sande_dist.errors import InputError

# preset -> (prompt field, input field, response field, system field)
PRESETS = {
    "alpaca": ("instruction", "input", "output", None),
    "openorca": ("question", None, "response", "system_prompt"),
    "prompt_response": ("prompt", None, "response", None),
    "sharegpt": ("conversations", None, None, None),
}
_SHAREGPT_USER = ("human", "user")
_SHAREGPT_BOT = ("gpt", "assistant", "bot", "model")
_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number from 1, object) for each non-blank line; InputError naming the line that is not one."""
    with open(path, encoding="utf-8", errors="strict") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path} line {number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                                 "JSONL needs one JSON object per line") from None
            if not isinstance(row, dict):
                raise InputError(f"{path} line {number}: a JSON {type(row).__name__}, expected an object")
            yield number, row


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); a .json "
                         "data file holds a list of objects (use .jsonl for one object per line)") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: holds a JSON {type(data).__name__}; a .json data file must hold a list of "
                         "objects (one per row)")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise InputError(f"{path}: row {index} is a JSON {type(row).__name__}, expected an object")
    return data


def _read_file(path: Path) -> list[dict]:
    """Rows of a local data file; any unreadable file is an InputError naming it (and the line)."""
    kind = _EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: unsupported data file type {path.suffix!r}; use json, jsonl, csv or parquet")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    try:
        if path.suffix.lower() == ".jsonl":
            return [row for _, row in read_jsonl(path)]
        if kind == "json":
            return _read_json(path)
        if kind == "csv":
            with open(path, newline="", encoding="utf-8") as fh:
                return list(csv.DictReader(fh))
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    except InputError:
        raise
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except Exception as exc:  # csv and pyarrow report damage in many types
        raise InputError(f"{path}: cannot be read as {kind} ({type(exc).__name__}: {str(exc)[:200]})") from None


def load_rows(source: str, split: str = "train") -> tuple[list[dict], str]:
    """Rows of ``source`` as dicts, and a display name for error messages."""
    from sande_dist.assets import DATASETS, dataset_file

    path = dataset_file(source) if source in DATASETS else Path(source).expanduser()
    if path.exists():
        return _read_file(path), str(path)
    if source.startswith((".", "/", "~")) or source.endswith(tuple(_EXTENSIONS)):
        raise InputError(f"data file {source} not found")
    import datasets

    return datasets.load_dataset(source, split=split).to_list(), source


def source_identity(source: str) -> str:
    """What a data source is, for skip keys: a local file's content identity, else the name itself."""
    from sande_dist.assets import DATASETS, dataset_file
    from sande_dist.rundir import file_identity

    path = dataset_file(source) if source in DATASETS else Path(source).expanduser()
    return file_identity(path) if path.exists() else source


def detect_preset(row: dict, name: str) -> str:
    keys = set(row)
    for preset in ("sharegpt", "alpaca", "openorca", "prompt_response"):
        prompt_f, _, response_f, _ = PRESETS[preset]
        if prompt_f in keys and (response_f is None or response_f in keys):
            return preset
    raise InputError(f"{name}: cannot tell the format from fields {sorted(keys)}; set data.preset "
                     f"({', '.join(PRESETS)}) or data.prompt_field/data.response_field")


def _text(row: dict, field: str, name: str, index: int, required: bool = True) -> str:
    if field not in row or row[field] is None:
        if not required:
            return ""
        raise InputError(f"dataset row {index} of {name} has no {field!r} field "
                         f"(fields: {', '.join(sorted(row))}); set data.prompt_field / data.response_field")
    value = row[field]
    if not isinstance(value, str):
        raise InputError(f"dataset row {index} of {name}: field {field!r} is {type(value).__name__}, expected a string")
    if required and not value.strip():
        raise InputError(f"dataset row {index} of {name}: field {field!r} is empty")
    return value


def _sharegpt(row: dict, name: str, index: int, field: str) -> tuple[str, str, Optional[str]]:
    turns = row.get(field)
    if not isinstance(turns, list) or not turns:
        raise InputError(f"dataset row {index} of {name}: field {field!r} must be a non-empty list of turns")
    system, user, response = None, None, None
    for turn in turns:
        if not isinstance(turn, dict):
            raise InputError(f"dataset row {index} of {name}: a turn in {field!r} is not an object")
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise InputError(f"dataset row {index} of {name}: a {role!r} turn has no string 'value'/'content'")
        if role == "system":
            system = value
        elif role in _SHAREGPT_USER and user is None:
            user = value
        elif role in _SHAREGPT_BOT and user is not None and response is None:
            response = value
    if not user or not user.strip() or not response or not response.strip():
        raise InputError(f"dataset row {index} of {name}: needs a non-empty user turn followed by an assistant turn")
    return user, response, system  # the first exchange: single-turn SFT


def to_samples(rows: list[dict], name: str, preset: str = "auto", prompt_field: Optional[str] = None,
               input_field: Optional[str] = None, response_field: Optional[str] = None,
               system_field: Optional[str] = None, require_response: bool = True) -> list[Sample]:
    """Normalise rows to clean Samples (the whole user message sits after the slot)."""
    if not rows:
        raise InputError(f"{name}: no rows")
    if preset == "auto":
        preset = "prompt_response" if prompt_field else detect_preset(rows[0], name)
    p_f, i_f, r_f, s_f = PRESETS[preset]
    p_f, i_f, r_f, s_f = prompt_field or p_f, input_field or i_f, response_field or r_f, system_field or s_f
    samples = []
    for index, row in enumerate(rows):
        if preset == "sharegpt":
            user, response, system = _sharegpt(row, name, index, p_f)
        else:
            user = _text(row, p_f, name, index)
            extra = _text(row, i_f, name, index, required=False) if i_f else ""
            if extra.strip():
                user = f"{user}\n\n{extra}"
            response = _text(row, r_f, name, index, required=require_response) if r_f else ""
            system = _text(row, s_f, name, index, required=False) or None if s_f else None
        samples.append(Sample(before="", after=user, response=response, system=system))
    return samples


def load_samples(source: str, *, split: str = "train", preset: str = "auto", prompt_field: Optional[str] = None,
                 input_field: Optional[str] = None, response_field: Optional[str] = None,
                 system_field: Optional[str] = None, require_response: bool = True) -> list[Sample]:
    rows, name = load_rows(source, split)
    return to_samples(rows, name, preset, prompt_field, input_field, response_field, system_field, require_response)
