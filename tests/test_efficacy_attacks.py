"""The efficacy rerun's attacks (eval/attacks.yaml) are valid configs of the kinds issue 17 asks for."""
from __future__ import annotations

import pytest

from sande_dist.config import load_config
from tests.conftest import REPO, load_script


def _efficacy():
    return load_script(REPO / "eval" / "efficacy.py")


def test_every_written_down_attack_is_a_valid_demo_config_and_they_cover_the_kinds_asked_for():
    import yaml

    efficacy = _efficacy()
    names = list(yaml.safe_load(efficacy.ATTACKS.read_text()))
    configs = {n: load_config(str(REPO / "configs" / "demo.yaml"), efficacy.attack_overrides(n)) for n in names}
    demo = configs.pop("demo")
    assert len(configs) == 3
    attacks = [c.attack for c in configs.values()]
    assert {a.position for a in attacks} == {"suffix", "random"}
    assert any(a.marker_mode == "replace" for a in attacks)
    assert any(len(a.triggers) > 1 for a in attacks)                        # several rare words
    assert any(len(t.split()) > 4 for a in attacks for t in a.triggers)      # a sentence
    # each differs from the demo's attack in trigger and marker
    assert all(set(a.triggers).isdisjoint(demo.attack.triggers) and a.marker != demo.attack.marker for a in attacks)


def test_an_unknown_attack_names_the_file_and_the_attacks_it_has(tmp_path):
    efficacy = _efficacy()
    with pytest.raises(SystemExit, match=r"'nope' is not in .*attacks.yaml; its attacks: demo"):
        efficacy.attack_overrides("nope")
    bad = tmp_path / "attacks.yaml"
    bad.write_text("x: attack.position\n")
    with pytest.raises(SystemExit, match=r"attacks.yaml: attack 'x' must be a list of KEY=VALUE"):
        efficacy.attack_overrides("x", bad)


def test_the_json_names_the_commit_it_ran_at(tmp_path):
    import subprocess

    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    # a checkout of its own, so that edits in the working tree cannot make "+changes" come or go
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    module = load_script(clone / "eval" / "efficacy.py", "efficacy_clone")
    assert module._commit() == head
    (clone / "README.md").write_text("changed\n")
    assert module._commit() == head + "+changes"
