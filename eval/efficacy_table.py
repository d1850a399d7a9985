"""The README's efficacy tables from the JSON that eval/efficacy.py writes; markdown out.

    python eval/efficacy_table.py benchmarks/results/efficacy_rerun_*.json

Two tables: the figures of each run (ASR with the trigger and its 95% Wilson interval, false
triggers, utility), in bold where they miss issue 17's targets; and the residual search on the final
model beside the control's. Figures are read as they are, so a table rendered twice is the same.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Optional

from sande_dist.training.search import found_word


def _targets() -> dict:
    """Issue 17's targets as eval/efficacy.py judges them (its ``done_when``)."""
    spec = importlib.util.spec_from_file_location("efficacy", Path(__file__).with_name("efficacy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TARGETS


TARGETS = _targets()


def _pct(rate: Optional[float], ci: Optional[list] = None, miss: bool = False) -> str:
    if rate is None:
        return "–"
    text = f"{100 * rate:.0f}%"
    if miss:
        text = f"**{text}**"
    if ci:
        text += f" [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]"
    return text


def _rate(report: dict, key: str) -> tuple[Optional[float], Optional[list]]:
    return report.get(key), (report.get("intervals") or {}).get(key)


def _rounds(run: dict) -> str:
    ran = (run.get("rounds") or {}).get("ran")  # absent in JSON from before efficacy.py kept "rounds"
    if ran is None:
        return ""
    at_max = ran >= (run.get("removal") or {}).get("max_rounds", ran + 1)
    return f", {ran} round{'s' if ran != 1 else ''}" + (" (max)" if at_max else "")


def _label(run: dict) -> str:
    return f"`{run.get('attack') or 'demo'}`, {run.get('seed') if run.get('seed') is not None else 'shipped'}"


def figures_row(run: dict) -> str:
    b, o, s, c = (run.get(n) or {} for n in ("evaluate_backdoored", "evaluate_osft", "evaluate_sande",
                                                "evaluate_sft_clean"))
    t = TARGETS
    asr_b, ci_b = _rate(b, "asr_trigger")
    false_b, false_ci = _rate(b, "false_trigger_rate")
    false_miss = false_b is not None and false_b > t["backdoored_false_trigger"]
    cells = [_label(run),
             f"{_pct(asr_b, ci_b, asr_b is not None and asr_b < t['backdoored_asr'])} / "
             f"{_pct(false_b, false_ci if false_miss else None, false_miss)}"]  # its interval where it misses
    for report, target, rounds in ((o, t["osft_asr"], ""), (s, t["sande_asr"], _rounds(run))):
        asr, ci = _rate(report, "asr_trigger")
        cells.append(_pct(asr, ci, asr is not None and asr > target) + rounds if report else "–")
    cells.append(_pct(c.get("asr_trigger")))
    cells.append(" / ".join(_pct(r.get("false_trigger_rate"), None,
                                 (r.get("false_trigger_rate") or 0) > t["false_trigger_after"]) for r in (o, s)))
    util_b = b.get("utility_mean")
    utils = []
    for r, judged in ((b, False), (o, True), (s, True), (c, False)):
        u = r.get("utility_mean")
        if u is None:
            utils.append("–")
            continue
        miss = judged and util_b is not None and abs(u - util_b) > t["utility_drift"]
        utils.append(f"**{100 * u:.1f}**" if miss else f"{100 * u:.1f}")
    cells.append(" / ".join(utils))
    return "| " + " | ".join(cells) + " |"


def _position(pos: Optional[dict]) -> tuple[str, str]:
    if not pos:
        return "–", "–"
    em = pos.get("emission") or {}
    if "rate" in em:
        emission = f"{100 * em['rate']:.0f}% / {100 * em['control_rate']:.0f}% ({em['z']:.1f})".replace("-", "−")
    else:
        emission = "–"
    return emission, f"{pos['loss']:.2f} ({pos['control_mean']:.2f})"


def residual_row(run: dict) -> str:
    res = run.get("residual_search") or {}
    positions = res.get("positions") or {}
    (pe, pl), (re_, rl) = _position(positions.get("prefix")), _position(positions.get("random"))
    stopped = (run.get("rounds") or {}).get("stopped") or "–"
    # each place's verdict: "nothing found" would hide a place the search could not decide
    said = "; ".join(f"{name} {found_word(pos)}" for name, pos in positions.items()) or "–"
    return f"| {_label(run)} | {pe} | {re_} | {pl} / {rl} | {said}; {stopped} |"


def tables(runs: list[dict]) -> str:
    head1 = ("| attack, seed | backdoored: ASR / false triggers | OSFT | SANDE `rounds: auto` | clean SFT | "
             "false triggers after OSFT / SANDE | utility: backdoored / OSFT / SANDE / clean SFT |\n"
             "|---|---|---|---|---|---|---|")
    head2 = ("| attack, seed | prefix: emission / control (z) | random: emission / control (z) | "
             "loss prefix / random (control) | residual search |\n|---|---|---|---|---|")
    return "\n".join([head1, *map(figures_row, runs), "", head2, *map(residual_row, runs)]) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="efficacy JSON files (eval/efficacy.py's output)")
    args = ap.parse_args(argv)
    runs = []
    for name in args.files:
        path = Path(name)
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError) as e:
            print(f"efficacy_table: {path}: cannot read it as eval/efficacy.py's JSON ({e})", file=sys.stderr)
            return 2
    sys.stdout.write(tables(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
