"""What a result was computed on. The same code's numbers move with it: times several-fold between CPUs
(without bf16 in hardware every stage computes in fp32), and on CPU the thread count changes the order of
float sums, and a training run with it (an inject stopped at step 264 at 1 thread and at 506 at 2, same
seed). Every ``stage.json`` and every benchmark's JSON carry ``machine()``."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_native_bf16() -> bool:
    """Does this CPU compute bf16 in hardware (x86 avx512_bf16 or amx_bf16, Arm bf16)? Without it
    torch emulates bf16 matmuls: 48x slower than fp32 on an AVX2-only EPYC (README)."""
    return bool(set(_cpuinfo().split()) & {"avx512_bf16", "amx_bf16", "bf16"})


def machine() -> dict:
    """CPU, cores, bf16 in hardware, torch's threads and the GPU of this process."""
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())
    return {"cpu": cpu, "cpus": os.cpu_count(), "cpu_native_bf16": cpu_has_native_bf16(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
