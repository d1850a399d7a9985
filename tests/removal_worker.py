"""One rank of a simulate or eliminate run for tests/test_removal.py (launched under torchrun).

Runs the real loop with the real objective on a tiny model, and records on rank 0
(in OUT/check.json) which model weights changed: each weight is gathered in full
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
    ap.add_argument("--parrot", action="append")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()

    from sande_dist.distributed.process_group import distributed

    with distributed() as info:
        from sande_dist.config import load_config
        from sande_dist.data.collator import Collator
        from sande_dist.data.formats import PromptFormat
        from sande_dist.data.stages import effective_len, stage_samples
        from sande_dist.distributed.ds_config import build_ds_config
        from sande_dist.models.loading import load_model, load_tokenizer
        from sande_dist.training.loop import run_loop
        from sande_dist.training.removal import EliminateObjective, SimulateObjective, gathered

        cfg = load_config(overrides=[f"model.path={args.model}", *args.set])
        tcfg = cfg.training.for_stage(args.stage)
        tok = load_tokenizer(cfg.model.path)
        samples = stage_samples(cfg, args.stage)
        collate = Collator(PromptFormat(tok), cfg.data.max_length, effective_len(cfg, args.stage),
                           reserve=cfg.removal.parrot_tokens)
        hidden = json.loads((Path(args.model) / "config.json").read_text())["hidden_size"]
        ds = build_ds_config(tcfg, info.world_size, hidden)
        model = load_model(cfg.model.path, cfg.model.dtype, ds)
        if args.stage == "simulate":
            objective = SimulateObjective(cfg, cfg.model.path, tok)
        else:
            objective = EliminateObjective(cfg, cfg.model.path, args.parrot)
        before = {n: gathered(p) for n, p in model.named_parameters()}
        out = Path(args.out)
        result = run_loop(model, objective, samples, collate, tcfg, ds, out, info, resume=False, desc=args.stage)
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
