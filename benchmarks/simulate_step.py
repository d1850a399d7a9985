"""Simulate step time: ours vs the reference's step, same model and batch, side by side (prints JSON).

Ours (``training/removal.py``, as the simulate stage runs it): one forward with
the parrot spliced, continuing from the key/value cache of the tokens all rows
share before the parrot (run once, one row, no graph), the LM head applied only
to the positions that predict a label. Reference-style (SANDE's
``ActorForTrigger.forward`` + ``GPTLMLoss``): an extra forward on the clean
prompt, full-vocabulary logits everywhere, the parrot's logits cut out, the loss
over all positions. Both train only the parrot (model frozen), Adam, one process.
Steps alternate between the two so that load from other jobs hits both alike.

    python benchmarks/simulate_step.py [--model smollm2-135m-instruct] [--batch 4] [--steps 10]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from sande_dist.config import load_config
from sande_dist.data.collator import IGNORE_INDEX, Collator
from sande_dist.data.formats import PromptFormat
from sande_dist.training.stages import stage_samples
from sande_dist.models.loading import load_model, load_tokenizer
from sande_dist.models.parrot import ParrotPrompt
from sande_dist.training.removal import parrot_loss, shared_head_length


def reference_loss(model, parrot: ParrotPrompt, batch: dict) -> torch.Tensor:
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # the clean forward
    embeds = model.get_input_embeddings()(batch["input_ids"])
    embeds, mask, _, _ = parrot(embeds, batch["attention_mask"], None, batch["slot_index"])
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    k = parrot.weight.shape[0]
    rows = [torch.cat([logits[i, :s], logits[i, s + k:]]) for i, s in enumerate(batch["slot_index"].tolist())]
    logits = torch.stack(rows)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--effective-len", type=int, default=None, help="response tokens in the loss (default all)")
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ablate-head-cache", action="store_true",
                    help="also time our step without the shared-head cache (what it contributes)")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = load_config(overrides=[f"model.path={args.model}", f"data.num_rows={args.batch}",
                                 f"removal.parrot_tokens={args.k}"])
    tok = load_tokenizer(cfg.model.path)
    batch = Collator(PromptFormat(tok), args.max_length, args.effective_len, reserve=args.k)(
        stage_samples(cfg, "simulate"))
    model = load_model(cfg.model.path, "float32").eval()
    model.requires_grad_(False)
    hidden = model.config.hidden_size
    runs = {}
    ours_loss = lambda m, p, b: parrot_loss(m, p, b, frozen_model=True)  # noqa: E731
    variants = [("ours", ours_loss), ("reference", reference_loss)]
    if args.ablate_head_cache:
        variants.append(("ours_without_head_cache", parrot_loss))
    for name, fn in variants:
        parrot = ParrotPrompt(args.k, hidden)
        runs[name] = {"fn": fn, "parrot": parrot, "opt": torch.optim.Adam(parrot.parameters(), lr=1e-2),
                      "times": [], "losses": []}

    for step in range(args.warmup + args.steps):
        for name, run in runs.items():
            t0 = time.perf_counter()
            out = run["fn"](model, run["parrot"], batch)
            loss = out[0] if isinstance(out, tuple) else out
            loss.backward()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            run["losses"].append(round(loss.item(), 5))
            if step >= args.warmup:
                run["times"].append(elapsed)

    step_s = {n: statistics.median(run["times"]) for n, run in runs.items()}
    ours, ref = step_s["ours"], step_s["reference"]
    ablation = {}
    if "ours_without_head_cache" in step_s:
        plain = step_s["ours_without_head_cache"]
        ablation = {"ours_without_head_cache_step_s": round(plain, 4), "speedup_without_head_cache": round(ref / plain, 3)}
    print(json.dumps({
        "model": args.model, "batch": args.batch, "seq_len": int(batch["input_ids"].shape[1]) + args.k,
        "k": args.k, "effective_len": args.effective_len,
        "shared_head_tokens": shared_head_length(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                                 batch["slot_index"]),
        "label_tokens": int((batch["labels"] != IGNORE_INDEX).sum()), "vocab": model.config.vocab_size,
        "threads": torch.get_num_threads(), "steps": args.steps,
        "ours_step_s": round(ours, 4), "reference_step_s": round(ref, 4), "speedup": round(ref / ours, 3),
        "target_speedup": 1.8,
        **ablation,
        # Same maths: the first losses agree; later ones differ only by the different float paths.
        "first_loss": {n: runs[n]["losses"][0] for n in runs},
    }, indent=2))


if __name__ == "__main__":
    main()
