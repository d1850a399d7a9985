"""Peak host memory of exporting a ZeRO-3-partitioned model, for models of growing depth.

Two ranks (gloo, CPU) hold a random Llama partitioned by ZeRO-3; rank 0's peak resident
memory is reset right before the export and read right after (Linux VmHWM), so the figure
is what the export itself adds. The project's export (models/export.py: a layer gathered at
a time, shards written and dropped) is compared with gathering the whole state dict on
rank 0 and calling save_pretrained, the usual way. The project's should stay near one shard
plus one layer whatever the depth; the usual way grows with the model.

    python benchmarks/export_memory.py [--depths 2,4,8,16,32] [--shard-mb 32] --out benchmarks/results/export_memory.json

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from emit import emit  # benchmarks/emit.py

HIDDEN, INTERMEDIATE, HEADS = 512, 1408, 8


def _vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def worker(model_dir: str, out: str, how: str, shard_mb: int) -> None:
    """One rank: load the model partitioned (ZeRO-3), export it, report rank 0's peak."""
    import torch.distributed as dist

    from sande_dist.config import TrainingConfig
    from sande_dist.distributed.ds_config import build_ds_config
    from sande_dist.distributed.process_group import distributed
    from sande_dist.models.export import export_hf
    from sande_dist.models.loading import load_model

    with distributed() as info:
        ds = build_ds_config(TrainingConfig(zero="zero3", micro_batch_size=1), info.world_size, HIDDEN)
        model = load_model(model_dir, "float32", ds)
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()], config=ds)
        dist.barrier()
        base = None
        if info.is_main:
            _reset_peak()
            base = _vmhwm()
        if how == "layerwise":
            export_hf(engine.module, Path(out) / "export", model_dir, "float32", max_shard_bytes=shard_mb << 20)
        else:  # the whole state dict on rank 0, then save_pretrained
            state = {}
            for name, param in engine.module.named_parameters():
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if info.is_main:
                        state[name] = param.data.detach().cpu().clone()
            if info.is_main:
                engine.module.save_pretrained(Path(out) / "export", state_dict=state, max_shard_size=f"{shard_mb}MB")
        dist.barrier()
        if info.is_main:
            (Path(out) / "peak.json").write_text(json.dumps({"peak_added_bytes": _vmhwm() - base}))


def _make_model(folder: Path, layers: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sande_dist.models.tiny import make_llama_tokenizer

    tok = make_llama_tokenizer(folder.parent / "tokenizer")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                      num_hidden_layers=layers, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() * 4 for p in model.parameters())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="2,4,8,16,32")
    ap.add_argument("--shard-mb", type=int, default=32)
    ap.add_argument("--out")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "OUT", "HOW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, args.shard_mb)
        return 0
    root = Path(tempfile.mkdtemp(prefix="export_memory_"))
    layer_bytes = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) * 4
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        model = root / f"depth{depth}" / "model"
        size = _make_model(model, depth)
        row = {"layers": depth, "model_bytes": size, "largest_layer_bytes": layer_bytes}
        for how in ("layerwise", "whole_state_dict"):
            out = root / f"depth{depth}" / how
            out.mkdir(parents=True)
            env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                   __file__, "--shard-mb", str(args.shard_mb), "--worker", str(model), str(out), how],
                                  env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            row[f"{how}_peak_added_bytes"] = json.loads((out / "peak.json").read_text())["peak_added_bytes"]
        rows.append(row)
    shard = args.shard_mb << 20
    largest = max(r["largest_layer_bytes"] for r in rows)
    # What the export may hold: the shard being filled and its serialised copy while it is written, the
    # layer being gathered and its CPU copy (on a GPU the gathered one is device memory), and a margin.
    bound = 2 * shard + 2 * largest + (64 << 20)
    result = {"shard_bytes": shard, "largest_layer_bytes": largest, "margin_bytes": 64 << 20, "bound_bytes": bound,
              "rows": rows, "layerwise_within_bound": all(r["layerwise_peak_added_bytes"] <= bound for r in rows)}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
