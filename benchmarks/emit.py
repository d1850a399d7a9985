"""Every benchmark ends the same way: one JSON object printed, and written to --out when given."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def emit(result: dict, out: Optional[str] = None) -> None:
    from sande_dist.machine import machine

    result = {**result, "machine": machine()}
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)  # a killed run leaves the previous result, never half a file
