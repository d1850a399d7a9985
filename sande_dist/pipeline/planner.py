"""`sande plan`: will a model train on a cluster, with which ZeRO preset and micro batch, and how fast.

Model states follow DeepSpeed's accounting (mixed precision with Adam): 2 bytes
of 16-bit weights per parameter, and 18 bytes that ZeRO partitions (16-bit
gradients 2, fp32 gradients 4, fp32 master weights 4, Adam moments 8).
ZeRO-2 keeps the 16-bit weights whole on every GPU; ZeRO-3 partitions them too
and gathers one layer at a time; ZeRO-3 + offload keeps the optimizer and the
weights in host memory. Activations are estimated for a Llama-style decoder in
bf16 with sdpa/flash attention (no s x s score matrix). Time uses the usual
6 x params x tokens FLOPs at a stated model-FLOPs utilisation (MFU).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from sande_dist.errors import InputError, read_json

GIB = 2**30
PRESETS = ("zero2", "zero3", "zero3_offload")
# Headroom per GPU for the CUDA context, communication buckets, ZeRO-3 prefetch and fragmentation.
RESERVED_GIB = 2.0
RESERVED_SHARE = 0.10
# DeepSpeed's own estimators pad host memory by this factor.
HOST_BUFFER = 1.5
MAX_MICRO_BATCH = 64


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = False

    @property
    def params(self) -> int:
        kv = self.hidden // self.heads * self.kv_heads
        per_layer = 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate \
            + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * per_layer + self.hidden

    @property
    def largest_layer_params(self) -> int:
        """The largest single module: the embedding (or lm_head) or an MLP projection."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


# Published Llama shapes; hub ids let a config's model.path name its shape without a download.
KNOWN_SHAPES = {
    "tinyllama-1.1b": ModelShape("tinyllama-1.1b", 2048, 22, 32, 4, 5632, 32000),
    "llama2-7b": ModelShape("llama2-7b", 4096, 32, 32, 32, 11008, 32000),
    "llama2-13b": ModelShape("llama2-13b", 5120, 40, 40, 40, 13824, 32000),
    "codellama-34b": ModelShape("codellama-34b", 8192, 48, 64, 8, 22016, 32000),
    "llama2-70b": ModelShape("llama2-70b", 8192, 80, 64, 8, 28672, 32000),
}
HUB_IDS = {
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": "tinyllama-1.1b",
    "meta-llama/Llama-2-7b-hf": "llama2-7b", "meta-llama/Llama-2-7b-chat-hf": "llama2-7b",
    "meta-llama/Llama-2-13b-hf": "llama2-13b", "meta-llama/Llama-2-13b-chat-hf": "llama2-13b",
    "codellama/CodeLlama-34b-hf": "codellama-34b",
    "meta-llama/Llama-2-70b-hf": "llama2-70b", "meta-llama/Llama-2-70b-chat-hf": "llama2-70b",
}


def shape_for_params(params: float) -> ModelShape:
    """A plausible shape for a bare parameter count: the nearest known one, its depth scaled to fit."""
    if params <= 0:
        raise InputError(f"--params must be positive, got {params:g}")
    base = min(KNOWN_SHAPES.values(), key=lambda s: abs(math.log(s.params / params)))
    if abs(math.log(base.params / params)) < 0.05:  # "7e9" means Llama-2 7B (6.74B)
        return base
    per_layer = (base.params - 2 * base.vocab * base.hidden - base.hidden) / base.layers
    layers = max(1, round((params - 2 * base.vocab * base.hidden - base.hidden) / per_layer))
    name = base.name if layers == base.layers else f"{base.name}-like ({layers} layers)"
    return ModelShape(name, base.hidden, layers, base.heads, base.kv_heads, base.intermediate, base.vocab)


def shape_from_hf_config(path: str | Path) -> ModelShape:
    """The shape in an HF config.json (or a model folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise InputError(f"model config {path} not found (give an HF config.json or a model folder)")
    c = read_json(p, "a model config")
    if not isinstance(c, dict):
        raise InputError(f"{p}: holds no JSON object (a model config)")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in c]
    if missing:
        raise InputError(f"{p}: no {', '.join(missing)}; the planner needs a decoder config (Llama-style)")
    return ModelShape(c.get("_name_or_path") or p.parent.name, c["hidden_size"], c["num_hidden_layers"],
                      c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"],
                      c["intermediate_size"], c["vocab_size"], bool(c.get("tie_word_embeddings", False)))


def shape_for_model_path(path: str) -> ModelShape:
    """The shape of a config's model.path: a known hub id, or a local folder with config.json."""
    if path in HUB_IDS:
        return KNOWN_SHAPES[HUB_IDS[path]]
    if Path(path).exists():
        return shape_from_hf_config(path)
    raise InputError(f"model.path {path!r}: shape unknown to the planner (known hub ids: "
                     f"{', '.join(HUB_IDS)}); give a local folder with config.json")


def model_state_bytes(preset: str, params: int, largest_layer: int, nodes: int,
                      gpus_per_node: int) -> tuple[float, float]:
    """(bytes per GPU, host bytes per node) for weights, gradients and Adam states, ZeRO-initialised."""
    gpus = nodes * gpus_per_node
    partitioned = 18 * params / gpus
    gathered_layer = 4 * largest_layer
    if preset == "zero2":
        # Every rank materialises the full model on the host before DeepSpeed partitions it.
        return 2 * params + partitioned, 4 * params * gpus_per_node * HOST_BUFFER
    if preset == "zero3":
        return partitioned + gathered_layer, 4 * largest_layer * gpus_per_node * HOST_BUFFER
    if preset == "zero3_offload":
        return gathered_layer, 18 * params / nodes * HOST_BUFFER
    raise InputError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, checkpointing: bool) -> float:
    """Activations kept for the backward pass of one micro batch on one GPU (bf16, sdpa attention)."""
    tokens = micro_batch * seq_len
    kv = shape.hidden // shape.heads * shape.kv_heads
    # Per token and layer: 16-bit inputs of the two norms, q/k/v, attention output, the MLP's
    # input and its four intermediate tensors (gate, up, act, product), plus the fp32 copies
    # the RMSNorms make.
    per_layer = tokens * (2 * (6 * shape.hidden + 2 * kv + 4 * shape.intermediate) + 8 * shape.hidden)
    # Logits in 16 bits and the fp32 log-softmax the loss keeps.
    logits = tokens * shape.vocab * (2 + 4)
    if checkpointing:
        # Only each layer's input is kept; one layer is recomputed at a time.
        return shape.layers * tokens * shape.hidden * 2 + per_layer + logits
    return shape.layers * per_layer + logits


@dataclass
class PresetPlan:
    preset: str
    model_states_gpu_gib: float
    model_states_cpu_gib_per_node: float
    micro_batch: int
    gradient_checkpointing: bool
    activations_gib: float
    total_gpu_gib: float
    fits: bool
    limit: str  # what does not fit: "", "gpu memory" or "host memory"


@dataclass
class Plan:
    model: str
    params: int
    largest_layer_params: int
    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float
    usable_gpu_gib: float
    cpu_mem_gib: Optional[float]
    seq_len: int
    activations_gib_per_sample: dict
    presets: list[PresetPlan]
    recommended: Optional[PresetPlan]
    mfu: float
    tflops_per_gpu: float
    seconds_per_1k_samples: float
    note: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _fit(preset: str, shape: ModelShape, params: int, nodes: int, gpus_per_node: int, usable: float,
         cpu_mem_gib: Optional[float], seq_len: int, micro_batch: Optional[int],
         checkpointing: Optional[bool]) -> PresetPlan:
    """The preset's best micro batch: without checkpointing when it fits, else with; or the given ones."""
    gpu, cpu = model_state_bytes(preset, params, shape.largest_layer_params, nodes, gpus_per_node)
    host_ok = cpu_mem_gib is None or preset != "zero3_offload" or cpu / GIB <= cpu_mem_gib * (1 - RESERVED_SHARE)
    options = [checkpointing] if checkpointing is not None else [False, True]
    sizes = [micro_batch] if micro_batch else [2**i for i in range(int(math.log2(MAX_MICRO_BATCH)), -1, -1)]
    best = None
    for gc in options:
        for mb in sizes:
            act = activation_bytes(shape, mb, seq_len, gc)
            gpu_ok = (gpu + act) / GIB <= usable
            limit = "" if gpu_ok and host_ok else ("host memory" if gpu_ok else "gpu memory")
            plan = PresetPlan(preset, round(gpu / GIB, 2), round(cpu / GIB, 2), mb, gc, round(act / GIB, 2),
                              round((gpu + act) / GIB, 2), not limit, limit)
            best = plan  # when nothing fits: the smallest footprint tried, last
            # Without checkpointing a micro batch of 1 is too small to keep a GPU busy; prefer >= 2.
            if plan.fits and (gc or mb >= 2 or len(options) == 1 or micro_batch):
                return plan
    return best


def plan(params: Optional[float] = None, shape: Optional[ModelShape] = None, nodes: int = 1,
         gpus_per_node: int = 8, gpu_mem_gib: float = 80.0, cpu_mem_gib: Optional[float] = None,
         seq_len: int = 2048, micro_batch: Optional[int] = None, preset: Optional[str] = None,
         gradient_checkpointing: Optional[bool] = None, mfu: float = 0.4,
         tflops_per_gpu: float = 989.0) -> Plan:
    """Memory per GPU under each preset, the recommended one, and the time per 1000 samples."""
    for name, value in (("nodes", nodes), ("gpus-per-node", gpus_per_node), ("gpu-mem-gib", gpu_mem_gib),
                        ("seq-len", seq_len), ("tflops-per-gpu", tflops_per_gpu)):
        if value <= 0:
            raise InputError(f"--{name} must be positive, got {value}")
    if not 0 < mfu <= 1:
        raise InputError(f"--mfu must be in (0, 1], got {mfu}")
    if micro_batch is not None and micro_batch < 1:
        raise InputError(f"--micro-batch must be at least 1, got {micro_batch}")
    if preset is not None and preset not in PRESETS:
        raise InputError(f"preset {preset!r} has no plan; choose from {', '.join(PRESETS)}")
    if shape is None:
        if params is None:
            raise InputError("give --params (e.g. 70e9) or --model-config")
        shape = shape_for_params(params)
    n = int(params) if params else shape.params
    usable = gpu_mem_gib * (1 - RESERVED_SHARE) - RESERVED_GIB
    rows = [_fit(p, shape, n, nodes, gpus_per_node, usable, cpu_mem_gib, seq_len, micro_batch,
                 gradient_checkpointing) for p in (PRESETS if preset is None else (preset,))]
    # Presets in order of speed: the first that fits is the recommendation.
    recommended = next((r for r in rows if r.fits), None)
    gpus = nodes * gpus_per_node
    seconds = 6 * n * 1000 * seq_len / (gpus * tflops_per_gpu * 1e12 * mfu)
    if recommended is None:
        note = "nothing fits: add GPUs or nodes, shorten --seq-len, or add host memory for offload"
    else:
        note = (f"{recommended.preset}, micro batch {recommended.micro_batch}, gradient checkpointing "
                f"{'on' if recommended.gradient_checkpointing else 'off'}")
    per_sample = {"without_checkpointing": round(activation_bytes(shape, 1, seq_len, False) / GIB, 3),
                  "with_checkpointing": round(activation_bytes(shape, 1, seq_len, True) / GIB, 3)}
    return Plan(shape.name, n, shape.largest_layer_params, nodes, gpus_per_node, gpu_mem_gib, round(usable, 2),
                cpu_mem_gib, seq_len, per_sample, rows, recommended, mfu, tflops_per_gpu, round(seconds, 1), note)


def plan_for_config(cfg, gpu_mem_gib: Optional[float] = None) -> Plan:
    """The plan for a pipeline config as it stands: its model, Slurm shape, preset, micro batch, length."""
    from sande_dist.data.stages import row_length
    from sande_dist.registry import TRAINING_KINDS

    gpu_mem = gpu_mem_gib or cfg.slurm.gpu_mem_gib
    if gpu_mem is None:
        raise InputError("set slurm.gpu_mem_gib (memory of one GPU) to check a config against the planner")
    if cfg.slurm.gpus_per_node < 1:
        raise InputError("slurm.gpus_per_node is 0: the planner sizes GPU jobs only")
    if cfg.training.zero not in PRESETS:
        raise InputError(f"training.zero {cfg.training.zero!r}: the planner knows {', '.join(PRESETS)}")
    longest = max(row_length(cfg, kind)[0] for kind in TRAINING_KINDS)  # a stage may have its own length
    return plan(shape=shape_for_model_path(cfg.model.path), nodes=cfg.slurm.nodes,
                gpus_per_node=cfg.slurm.gpus_per_node, gpu_mem_gib=gpu_mem, seq_len=longest,
                micro_batch=cfg.training.micro_batch_size, preset=cfg.training.zero,
                gradient_checkpointing=cfg.training.gradient_checkpointing)


def format_table(p: Plan) -> str:
    lines = [f"model {p.model}: {p.params / 1e9:.2f}B parameters, largest layer {p.largest_layer_params / 1e6:.0f}M",
             f"cluster: {p.nodes} node(s) x {p.gpus_per_node} GPU(s), {p.gpu_mem_gib:g} GiB each "
             f"({p.usable_gpu_gib:g} GiB usable after headroom)",
             f"activations per sample at {p.seq_len} tokens: "
             f"{p.activations_gib_per_sample['without_checkpointing']:.2f} GiB, "
             f"{p.activations_gib_per_sample['with_checkpointing']:.2f} GiB with gradient checkpointing",
             "",
             f"{'preset':<14}{'states/GPU':>11}{'host/node':>11}{'micro':>7}{'ckpt':>6}{'activ.':>9}"
             f"{'total/GPU':>11}  fits",
             ]
    for r in p.presets:
        lines.append(f"{r.preset:<14}{r.model_states_gpu_gib:>10.1f}G{r.model_states_cpu_gib_per_node:>10.1f}G"
                     f"{r.micro_batch:>7}{'on' if r.gradient_checkpointing else 'off':>6}"
                     f"{r.activations_gib:>8.1f}G{r.total_gpu_gib:>10.1f}G  {'yes' if r.fits else 'no: ' + r.limit}")
    hours = p.seconds_per_1k_samples / 3600
    lines += ["", f"recommended: {p.note}",
              f"time per 1000 samples of {p.seq_len} tokens: {p.seconds_per_1k_samples:.0f} s ({hours:.2f} h) "
              f"at MFU {p.mfu:.0%} of {p.tflops_per_gpu:g} TFLOP/s per GPU (6 x params x tokens)"]
    return "\n".join(lines)
