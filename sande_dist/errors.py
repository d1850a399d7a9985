"""The kinds of failure the CLI tells apart (exit 2, 1 and 75), and reading a JSON file a user gave."""

import json
from pathlib import Path


class InputError(ValueError):
    """Bad user input: the message names the file, row, key or flag and what to do. Exit 2."""


class StageError(RuntimeError):
    """A stage failed while running: the message names the stage and its log. Exit 1."""


# sysexits.h EX_TEMPFAIL: try again later. A rerun of the same command resumes from the checkpoint.
EXIT_STOPPED = 75


class StageStopped(StageError):
    """A stage stopped on a signal after saving a checkpoint: nothing failed, a rerun resumes. Exit 75."""


def read_json(path: str | Path, what: str = "") -> object:
    """The JSON in a file the user handed over; InputError naming the file (and ``what`` it is) otherwise."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}{f' ({what})' if what else ''}: not valid JSON ({exc.msg} at line {exc.lineno}, "
                         f"column {exc.colno})") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}{f' ({what})' if what else ''}: not valid JSON (not UTF-8 text: byte "
                         f"{exc.object[exc.start]:#04x} at offset {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}{f' ({what})' if what else ''}: cannot be read ({exc.strerror or exc})") from None
