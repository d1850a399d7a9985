"""One rank of a simulate or eliminate run for tests/test_removal.py (launched under torchrun).

Runs the stage's own set-up and loop (``training.stages.setup_training`` / ``train``)
with the registry's objective on a tiny model, and records on rank 0 (in
OUT/check.json) which model weights changed: each weight is gathered in full
before and after training and compared bit for bit.
"""
import argparse
import json
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["simulate", "eliminate"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--parrot", action="append", default=[])
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()

    from sande_dist.distributed.process_group import distributed

    with distributed() as info:
        from sande_dist.config import resolve_config
        from sande_dist.registry import StageOptions
        from sande_dist.training.removal import gathered
        from sande_dist.training.stages import build_objective, setup_training, stage_training, train

        out = Path(args.out)
        cfg = resolve_config(None, args.set, run_dir=str(out), model=args.model)
        objective = build_objective(cfg, args.stage, StageOptions(parrots=tuple(args.parrot)), args.model)
        setup = setup_training(cfg, args.stage, stage_training(cfg, args.stage), args.model, objective, info)
        before = {n: gathered(p) for n, p in setup.model.named_parameters()}
        result = train(setup, out, info, resume=False)
        record = objective.finish(result, out)
        changed = [n for n, p in result.module.model.named_parameters() if not torch.equal(gathered(p), before[n])]
        parrots_after = [gathered(result.module.extras[k].weight) for k in sorted(result.module.extras.keys())]
        if info.is_main:
            losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
            if args.stage == "eliminate":
                from sande_dist.models.parrot import load_parrot

                record["parrot_identical"] = len(parrots_after) == len(args.parrot) and all(
                    torch.equal(after, load_parrot(path)[0]) for after, path in zip(parrots_after, args.parrot))
            check = {"record": record, "changed": changed, "num_params": len(before), "losses": losses,
                     "world_size": info.world_size, "steps": result.step}
            (out / "check.json").write_text(json.dumps(check, indent=2))
            print(f"{info.tag} {args.stage} done: {len(changed)}/{len(before)} weights changed", flush=True)


if __name__ == "__main__":
    sys.exit(main())
