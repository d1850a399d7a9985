"""Does a norm budget on the parrot give the prefix search power where the clean base says the marker itself?

The efficacy rerun (README, *Removal efficacy*) found that a one-vector parrot at the prefix makes the
clean base emit the demo's and two other attacks' markers on 76-99% of held-out rows, so the residual
search there can never show "more than the control" nor "not found" with power, and `rounds: auto` runs
to its maximum. This script runs `sande scan` at the prefix only, for each case (a model and its marker,
against the clean base as reference), with `removal.parrot_max_norm` at each given budget, and prints the
cleaned-up figures: the model's and the control's emission, z, power, verdict, losses and wall time.
A budget helps where the control's emission falls while a backdoored model's stays high.

    python benchmarks/prefix_norm_cap.py --run-root /tmp/cap --cap 3.15 \
        --case backdoored=RUN/inject/model::'Buy crypto now!' --case base=smollm2-135m-instruct::'You are stupid.'

Each budget and marker gets a run dir; the control on the base still reruns for each case, since the
scanned model is part of the run's config and so of the control's key.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from emit import emit  # noqa: E402

BASE = "smollm2-135m-instruct"


def parse_case(text: str) -> tuple[str, str, str]:
    label, sep, rest = text.partition("=")
    model, sep2, marker = rest.partition("::")
    if not (sep and sep2 and label and model and marker):
        raise SystemExit(f"--case {text!r}: expected LABEL=MODEL::MARKER")
    return label, model, marker


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-root", required=True, help="one run dir per budget and marker is made under it")
    ap.add_argument("--cap", action="append", required=True,
                    help="removal.parrot_max_norm (L2 per vector), or 'none'; repeatable")
    ap.add_argument("--case", action="append", required=True, help="LABEL=MODEL::MARKER; repeatable")
    ap.add_argument("--restarts", type=int, default=1, help="removal.search_restarts (the rerun used 3)")
    ap.add_argument("--config", default="demo")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="more config overrides for every scan (e.g. training.seed=1); repeatable")
    ap.add_argument("--out")
    args = ap.parse_args()
    cases = [parse_case(c) for c in args.case]
    rows = []
    for cap in args.cap:
        for label, model, marker in cases:
            run_dir = Path(args.run_root) / f"cap_{cap}" / slug(marker)
            sets = ["removal.extra_parrots=[]", f"removal.search_restarts={args.restarts}",
                    *([] if cap == "none" else [f"removal.parrot_max_norm={cap}"]), *args.overrides]
            cmd = [sys.executable, "-m", "sande_dist.cli", "scan", args.config, "--run-dir", str(run_dir),
                   "--model", model, "--marker", marker, "--reference", BASE, "--json",
                   *(x for s in sets for x in ("--set", s))]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            row = {"cap": cap, "case": label, "model": model, "marker": marker, "rc": proc.returncode,
                   "wall_s": round(time.time() - t0, 1)}
            if proc.returncode != 0:
                row["stderr_tail"] = proc.stderr[-2000:]
            else:
                result = json.loads(proc.stdout)
                prefix = result["by_position"]["prefix"]
                row.update(backdoor=result["backdoor"], decided_by=prefix.get("decided_by"),
                           loss=prefix.get("loss"), control_mean=prefix.get("control_mean"),
                           emission=prefix.get("emission"))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    emit({"what": "sande scan at the prefix only, one-vector parrot, against the clean base, with "
                  "removal.parrot_max_norm at each budget ('none': unconstrained)",
          "restarts": args.restarts, "config": args.config, "overrides": args.overrides, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
