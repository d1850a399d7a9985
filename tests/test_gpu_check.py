"""The GPU check runs its parts on CPU as a dry run: the same stage code, a tiny model, a few steps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["params"] > 0
    train = report["parts"]["train_sdpa"]
    for kind in ("inject", "simulate"):
        assert train[kind]["step_time_s"] > 0 and train[kind]["tokens_per_s"] > 0
        assert train[kind]["deepspeed"]["zero_stage"] == 3 and train[kind]["deepspeed"]["gradient_checkpointing"]
    assert "export" in train["inject"]["timings"]
    assert "vllm" in report["problems"]  # CUDA vLLM is the GPU run's part
    # every benchmark's JSON says where it ran: times move several-fold between CPUs
    assert report["machine"]["cpus"] == os.cpu_count() and report["machine"]["gpu"] is None
    assert isinstance(report["machine"]["cpu_native_bf16"], bool) and report["machine"]["cpu"]
