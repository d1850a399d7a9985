"""A built wheel works from any directory: the presets, Slurm templates and configs ship inside it.

The wheel is built from the repository's files, installed with --no-deps into a fresh venv
that sees this venv's packages (torch, transformers, ...) through a .pth line but not its
editable sande_dist, and run from a temporary directory far from the checkout.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, **kw):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", src],
         cwd=root)
    wheel = next((root / "dist").glob("sande_dist-*.whl"))
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=root)
    site = Path(_run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=root).stdout.strip())
    # This venv's dependencies, visible to the fresh one (a .pth line adds a path; it does not run the
    # editable install's finder, which lives in a .pth file of that folder).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps", wheel],
         cwd=root)
    return venv, root


def test_wheel_carries_its_resources(installed):
    venv, root = installed
    where = _run([venv / "bin" / "python", "-c", "import sande_dist.resources as r, sande_dist; "
                  "print(sande_dist.__file__); print(r.folder('ds_configs')); print(r.folder('slurm'))"],
                 cwd=root).stdout.split()
    assert all(p.startswith(str(venv)) for p in where), where  # the installed copy, not the checkout


def test_installed_sande_runs_from_a_temporary_directory(installed, tmp_path):
    venv, _ = installed
    sande = venv / "bin" / "sande"
    shown = _run([sande, "config", "show", "demo", "--set", "training.zero=zero3_offload"], cwd=tmp_path).stdout
    assert "zero: zero3_offload" in shown and "smollm2-135m-instruct" in shown
    out = _run([sande, "run", "llama2-7b-alpaca", "--executor", "slurm", "--dry-run", "--run-dir", tmp_path / "run"],
               cwd=tmp_path).stdout
    assert "inject: sbatch --parsable" in out and "afterok:<eliminate>" in out
    script = (tmp_path / "run" / "slurm" / "inject.sbatch").read_text()
    assert "torch.distributed.run" in script and "--rdzv_backend c10d" in script
    assert str(venv) in script  # the job runs the installed interpreter
    bad = subprocess.run([str(sande), "config", "show", "demo", "--set", "training.zero=zero9"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "zero3_offload" in bad.stderr  # the shipped presets are listed
