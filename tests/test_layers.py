"""The package's shape: imports only run down the layer order, no module imports in a circle, every
registry entry names code that exists, and a stage's code hash follows only the code it runs."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sande_dist import source
from sande_dist.registry import KINDS, PIPELINE_STAGES, load
from sande_dist.rundir import stage_code


def test_sande_dist_has_no_cycle_and_no_upward_import():
    graph = source.import_graph(source.package_root(), "sande_dist")
    assert len(graph) > 40  # every module was read
    assert source.cycles(graph) == []
    assert source.layer_violations(graph, source.LAYERS) == []


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root / "pkg"


LAYERS = (("pkg", "pkg.base"), ("pkg.mid",), ("pkg.top",))


def test_a_cycle_and_an_upward_import_are_found(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "",
        "base.py": "def f():\n    from pkg.mid import helpers  # lazy, still a dependency\n",
        "mid/__init__.py": "",
        "mid/helpers.py": "from pkg import base\nfrom .other import g\n",
        "mid/other.py": "import pkg.mid.helpers\ndef g(): pass\n",
        "top.py": "from pkg.mid.helpers import *\n",
    })
    graph = source.import_graph(pkg, "pkg")
    assert graph["pkg.mid.helpers"] == {"pkg.base", "pkg.mid.other"}  # relative imports resolved
    loops = {frozenset(c) for c in source.cycles(graph)}
    assert frozenset({"pkg.base", "pkg.mid.helpers"}) in loops
    assert frozenset({"pkg.mid.helpers", "pkg.mid.other"}) in loops
    problems = source.layer_violations(graph, LAYERS)
    assert problems == ["pkg.base (layer 0) imports pkg.mid.helpers (layer 1): up the layer order"]


def test_a_clean_package_passes_and_an_unplaced_module_is_named(tmp_path):
    pkg = _package(tmp_path, {"__init__.py": "", "base.py": "", "mid/__init__.py": "from pkg import base\n",
                              "top.py": "import pkg.mid\n", "stray.py": ""})
    graph = source.import_graph(pkg, "pkg")
    assert source.cycles(graph) == []
    assert source.layer_violations(graph, LAYERS) == ["pkg.stray: in no layer; add it to LAYERS"]


def test_registry_names_code_that_exists():
    for kind in KINDS.values():
        for spec in (kind.entry, kind.samples, kind.objective, kind.training):
            if spec:
                assert callable(load(spec)), spec
    assert {"inject", "osft", "sft_clean", "simulate", "eliminate", "generate", "evaluate"} <= set(KINDS)
    assert {"sft_clean", "evaluate_sft_clean"} <= set(PIPELINE_STAGES)


def test_stage_code_follows_only_the_code_a_stage_runs():
    graph = source.import_graph(source.package_root(), "sande_dist")
    train = source.closure(KINDS["eliminate"].module_names, graph)
    evaluate = source.closure(KINDS["evaluate"].module_names, graph)
    assert "sande_dist.training.loop" in train and "sande_dist.training.loop" not in evaluate
    assert "sande_dist.evaluation.report" in evaluate and "sande_dist.evaluation.report" not in train
    assert "sande_dist.config" in train and "sande_dist.config" in evaluate
    assert stage_code("eliminate") != stage_code("evaluate")
    # inject checks itself with its own objective; OSFT does not run that code
    inject, osft = (source.closure(KINDS[k].module_names, graph) for k in ("inject", "osft"))
    assert "sande_dist.training.inject" in inject and "sande_dist.training.inject" not in osft
    assert stage_code("inject") != stage_code("osft") != stage_code("simulate")


def test_stage_code_changes_when_a_module_it_imports_changes(tmp_path):
    """A copy of the package: editing the loop changes the training kinds' hash, not evaluate's."""
    import shutil

    copy = tmp_path / "sande_dist"
    shutil.copytree(source.package_root(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); from sande_dist.rundir import stage_code; "
             "print(stage_code('eliminate'), stage_code('evaluate'))")
    before = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, check=True)
    with open(copy / "training" / "loop.py", "a") as fh:
        fh.write("\n# a fix\n")
    after = subprocess.run([sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, check=True)
    (eli0, ev0), (eli1, ev1) = before.stdout.split(), after.stdout.split()
    assert eli0 != eli1 and ev0 == ev1


@pytest.mark.parametrize("module", ["sande_dist.cli", "sande_dist.config", "sande_dist.pipeline.graph"])
def test_command_line_modules_do_not_import_torch(module):
    """`sande --help`, `config show` and the graph stay light: torch only where a stage runs."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
