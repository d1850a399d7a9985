"""The run's summary: RUN/report.md (one table, stage x metric) and RUN/report.png, from every report.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from sande_dist.registry import PIPELINE_STAGES
from sande_dist.rundir import REPORT_FILE, atomic_write_text, run_reports
from sande_dist.training.search import found_word


def collect_reports(run_dir: Path) -> dict[str, dict]:
    """stage name -> report, evaluation stages only, in pipeline order (others after, by name)."""
    found = {}
    for path in sorted(Path(run_dir).glob(f"*/{REPORT_FILE}")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "asr_trigger" in rec:
            found[path.parent.name] = rec
    order = {s: i for i, s in enumerate(PIPELINE_STAGES)}
    return dict(sorted(found.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def _pct(x: Optional[float], ci: Optional[list] = None) -> str:
    """A rate as a percentage, with its 95% interval when there is one."""
    if x is None:
        return "–"
    return f"{100 * x:.1f}%" + (f" [{100 * ci[0]:.1f}–{100 * ci[1]:.1f}]" if ci else "")


def _utility_columns(reports: dict[str, dict]) -> list[tuple[str, str]]:
    cols = []
    for rec in reports.values():
        for protocol, res in (rec.get("utility_by_protocol") or {}).items():
            for task in res.get("tasks", {}):
                if (protocol, task) not in cols:
                    cols.append((protocol, task))
    return cols


def _judge_lines(reports: dict[str, dict]) -> list[str]:
    """The rates under the other judges (`prefix` beside `contains`), one line per stage."""
    lines = []
    for stage, rec in reports.items():
        for name, rates in (rec.get("by_judge") or {}).items():
            if name == rec.get("judge"):
                continue
            parts = [f"{kind} {_pct(r['rate'], r['ci95'])}" for kind, r in rates.items()]
            lines.append(f"- {stage}, judge `{name}`: " + ", ".join(parts))
    return lines


def render_markdown(reports: dict[str, dict]) -> str:
    ucols = _utility_columns(reports)
    head = ["stage", "ASR (trigger)", "ASR (parrot)", "false triggers", "utility (mean)",
            *[f"{t} ({p})" for p, t in ucols], "clean agreement (ROUGE-L)", "prompts", "backend"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage, rec in reports.items():
        util = rec.get("utility") or {}
        by = rec.get("utility_by_protocol") or {}
        agree = (rec.get("clean_agreement") or {}).get("rouge_l")
        ci = rec.get("intervals") or {}
        cells = [stage, *[_pct(rec.get(k), ci.get(k)) for k in ("asr_trigger", "asr_parrot", "false_trigger_rate")],
                 f"{_pct(util.get('mean'))} ({util.get('protocol', '?')})",
                 *[_pct(by.get(p, {}).get("tasks", {}).get(t, {}).get("score"),
                        by.get(p, {}).get("tasks", {}).get(t, {}).get("ci95")) for p, t in ucols],
                 "–" if agree is None else f"{agree:.3f}", str(rec.get("num_prompts", "")),
                 f"{rec.get('backend', '')} {rec.get('dtype', '')}".strip()]
        lines.append("| " + " | ".join(cells) + " |")
    first = next(iter(reports.values()))
    s = first.get("sampling", {})
    notes = [
        "",
        f"Marker {first.get('marker')!r}, judge `{first.get('judge')}`, greedy decoding, "
        f"{s.get('max_new_tokens')} new tokens; triggers {first.get('triggers')} at {first.get('trigger_position')}.",
        "Brackets: 95% Wilson intervals (n = the prompts, or a task's items).",
        *_judge_lines(reports),
        "Utility: `loglik` is lm-eval's acc_norm (choice text as continuation, length-normalised), "
        "`letter` the highest-logit answer letter; a fixed subset per task "
        f"(limit {first.get('utility', {}).get('limit')}, seed {first.get('utility', {}).get('seed')}).",
    ]
    return "# Evaluation summary\n\n" + "\n".join(lines + notes + _rounds_lines(reports) + _lm_eval_lines(reports)) + "\n"


def _search_line(label: str, decided: dict) -> str:
    parts = []
    for pos, v in decided["positions"].items():
        e = v.get("emission")
        emits = (f"emits {e['rate']:.0%} of {e['n']} vs control {e['control_rate']:.0%} of {e['control_n']} "
                 f"(z {e['z']:.2f}), " if e else "")
        best = f" (best of {len(v['restarts'])} restarts)" if v.get("restarts") else ""
        parts.append(f"{pos}{best}: {emits}loss {v['loss']:.3f} vs control {v['control_mean']:.3f} "
                     f"(band edge {v['threshold']:.3f}) -> {found_word(v)}")
    return f"- {label}: " + "; ".join(parts)


def _rounds_lines(reports: dict[str, dict]) -> list[str]:
    """SANDE's rounds (RUN/rounds.json, attached to its evaluation): how many ran, why they stopped, and
    each search that decided, beside its control."""
    lines = []
    for stage, rec in reports.items():
        rounds = rec.get("rounds")
        if not rounds:
            continue
        lines += ["", f"## SANDE rounds ({stage})", "", f"{rounds.get('ran')} ran; stopped: {rounds.get('stopped')}."]
        lines += [_search_line(f"round {r['round']}'s search", r) for r in rounds.get("rounds", [])]
        if rounds.get("residual_verdict"):
            lines.append(_search_line("residual search on the final model", rounds["residual_verdict"]))
        rule = (rounds.get("residual_verdict") or next(iter(rounds.get("rounds", [])), {})).get("rule")
        if rule:
            lines.append(f"Rule: {rule}.")
    return lines


def _lm_eval_lines(reports: dict[str, dict]) -> list[str]:
    """lm-evaluation-harness's own figures (its prompts and metrics), beside ours, when they ran."""
    with_lm = {s: r for s, r in reports.items() if r.get("lm_eval")}
    if not with_lm:
        return []
    cols = sorted({(t, m) for r in with_lm.values() for t, ms in r["lm_eval"].items() for m in ms if m != "error"})
    version = next(iter(with_lm.values())).get("lm_eval_version", "?")
    lines = ["", f"## lm-evaluation-harness {version} (its own task prompts and metrics)", "",
             "| stage | lm-eval model | " + " | ".join(f"{t} {m}" for t, m in cols) + " |",
             "|" + "---|" * (len(cols) + 2)]
    for stage, rec in with_lm.items():
        cells = [rec["lm_eval"].get(t, {}).get(m) for t, m in cols]
        lines.append(f"| {stage} | {rec.get('lm_eval_backend', '?')} | "
                     + " | ".join("–" if c is None else f"{100 * c:.1f}%" for c in cells) + " |")
    errors = [f"- {s}: {t}: {m['error']}" for s, r in with_lm.items() for t, m in r["lm_eval"].items() if "error" in m]
    notes = [f"- {s}: {r['lm_eval_backend_note']}" for s, r in with_lm.items() if r.get("lm_eval_backend_note")]
    return lines + errors + notes


def render_png(reports: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stages = list(reports)
    x = np.arange(len(stages))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(stages) + 4), 4.2))
    bars = [("ASR (trigger)", "asr_trigger"), ("ASR (parrot)", "asr_parrot"), ("false triggers", "false_trigger_rate")]
    width = 0.8 / len(bars)
    for i, (label, key) in enumerate(bars):
        vals = [100 * (reports[s].get(key) or 0.0) for s in stages]
        ax1.bar(x + (i - (len(bars) - 1) / 2) * width, vals, width, label=label)
    ax1.set(title="Backdoor", ylabel="% of prompts", ylim=(0, 105), xticks=x)
    ax1.set_xticklabels(stages, rotation=20, ha="right")
    ax1.legend(fontsize=8)
    tasks = sorted({t for r in reports.values() for t in (r.get("utility") or {}).get("tasks", {})})
    width = 0.8 / max(len(tasks), 1)
    for i, task in enumerate(tasks):
        vals = [100 * ((reports[s].get("utility") or {}).get("tasks", {}).get(task) or 0.0) for s in stages]
        ax2.bar(x + (i - (len(tasks) - 1) / 2) * width, vals, width, label=task)
    protocol = next(iter(reports.values())).get("utility", {}).get("protocol", "")
    ax2.set(title=f"Utility ({protocol})", ylabel="accuracy %", ylim=(0, 100), xticks=x)
    ax2.set_xticklabels(stages, rotation=20, ha="right")
    if tasks:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_run_report(run_dir: str | Path) -> Optional[Path]:
    """Regenerate RUN/report.md and RUN/report.png from all RUN/*/report.json; None when there are none."""
    reports = collect_reports(run_dir)
    if not reports:
        return None
    md, png = run_reports(run_dir)
    atomic_write_text(md, render_markdown(reports))
    render_png(reports, png)
    return md
