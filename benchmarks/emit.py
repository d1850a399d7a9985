"""Every benchmark ends the same way: one JSON object printed, and written to --out when given."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Optional


def machine() -> dict:
    """Where the script ran. The same code's times move several-fold between CPUs: on one without bf16
    in hardware every stage computes in fp32 (README, "CPUs without bf16"), so a figure needs its machine."""
    import torch

    from sande_dist.models.loading import cpu_has_native_bf16

    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor() or platform.machine())
    return {"cpu": cpu, "cpus": os.cpu_count(), "cpu_native_bf16": cpu_has_native_bf16(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def emit(result: dict, out: Optional[str] = None) -> None:
    result = {**result, "machine": machine()}
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text + "\n")
        tmp.replace(path)  # a killed run leaves the previous result, never half a file
