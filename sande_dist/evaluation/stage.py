"""`sande evaluate`: ASR, parrot ASR, false-trigger rate, utility, clean agreement -> RUN/<name>/report.json.

Reads top to bottom: check every input (model, parrot, tasks, prompts) before an
engine starts, so bad input is an exit-2 error in seconds; build the prompts as
token ids (and the parrot's as embeddings); one greedy ``generate`` for clean,
triggered and parrot prompts together; score utility; close the engine; then
lm-eval and the reference's clean answers, which may need engines of their own.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from sande_dist.config import Config
from sande_dist.data.formats import PromptFormat, Sample
from sande_dist.data.stages import eval_samples
from sande_dist.data.poison import place_trigger, slot_at
from sande_dist.errors import InputError, read_json
from sande_dist.evaluation.agreement import clean_agreement
from sande_dist.evaluation.asr import judge, rate
from sande_dist.evaluation.report import write_run_report
from sande_dist.evaluation.utility import check_tasks, evaluate_utility
from sande_dist.generation.engine import GenerationParams, load_input_embeddings
from sande_dist.generation.factory import make_engine
from sande_dist.models.loading import adapter_record, check_model, load_tokenizer
from sande_dist.registry import StageOptions
from sande_dist.rundir import (GENERATIONS_FILE, REPORT_FILE, atomic_write_json, atomic_write_text, file_identity,
                               fingerprint, generations_file, model_identity, parrot_file, report_file, stage_code,
                               stage_dir, stage_done, write_stage)
from sande_dist.timing import Phases
from sande_dist.tracking import Tracker


def resolve_parrot(cfg: Config, parrot_arg: Optional[str], model_dir: str, reference: Optional[str]):
    """(path, vectors, meta) of the parrot to evaluate, or None when there is none.

    A parrot must come from the evaluated model or from the model it was cleaned
    from (``--reference``): the pipeline applies the backdoored model's parrot to
    the cleaned models on purpose. Anything else is a parrot for another model.
    """
    from sande_dist.models.parrot import load_parrot

    if parrot_arg:
        path = Path(parrot_arg)
    else:
        path = parrot_file(cfg.run_dir)
        if not path.exists():
            return None
    vectors, meta = load_parrot(path, model_dir, check_fingerprint=False)
    allowed = {model_identity(model_dir)}
    if reference and (Path(reference) / "config.json").exists():
        allowed.add(model_identity(reference))
    if meta.get("base_fingerprint") not in allowed:
        raise InputError(f"parrot {path} was simulated on a model with fingerprint {meta.get('base_fingerprint')} "
                         f"({meta.get('base_model', 'unknown path')}), but the evaluated model {model_dir} "
                         f"(or its --reference) has {sorted(allowed)}; pass the parrot simulated on this model "
                         "or on the model it was cleaned from")
    return path, vectors.float(), meta


def parrot_request(fmt: PromptFormat, table: torch.Tensor, sample: Sample, vectors: torch.Tensor,
                   position: str, rng: Optional[random.Random] = None) -> torch.Tensor:
    """embed(ids before the slot) ++ parrot ++ embed(ids after it), as training splices it."""
    ids, slot = fmt.encode_prompt(slot_at(sample, position, rng))
    ids = torch.tensor(ids, dtype=torch.long)
    return torch.cat([table[ids[:slot]], vectors, table[ids[slot:]]])


def _reference_answers(cfg: Config, reference: str, samples: list[Sample], params: GenerationParams,
                       run_dir: Path) -> tuple[list[str], str]:
    """The reference's clean answers: from an evaluation that already made them, else generated now."""
    wanted = [s.user for s in samples]
    ref = Path(reference)
    candidates = [ref] if (ref / GENERATIONS_FILE).exists() else []
    if not candidates and (ref / "config.json").exists():
        identity = model_identity(ref)
        for report in sorted(run_dir.glob(f"*/{REPORT_FILE}")):
            rec = json.loads(report.read_text())
            if rec.get("model_fingerprint") == identity and rec.get("sampling") == _sampling(params) \
                    and (report.parent / GENERATIONS_FILE).exists():
                candidates.append(report.parent)
    for folder in candidates:
        clean = {}
        for line in (folder / GENERATIONS_FILE).read_text().splitlines():
            row = json.loads(line)
            if row["kind"] == "clean":
                clean[row["prompt"]] = row["response"]
        if all(p in clean for p in wanted):
            return [clean[p] for p in wanted], str(folder / GENERATIONS_FILE)
        if folder == ref:
            raise InputError(f"--reference {reference}: its {GENERATIONS_FILE} lacks some of these prompts; "
                             "evaluate both with the same eval.prompts, eval.num_prompts and eval.seed")
    if not (ref / "config.json").exists() and not ref.exists():
        raise InputError(f"--reference {reference}: neither a model folder nor an evaluation folder with "
                         f"{GENERATIONS_FILE}")
    fmt = PromptFormat.from_config(load_tokenizer(check_model(reference)), cfg.data)
    with make_engine(cfg, reference) as engine:
        return engine.generate([fmt.prompt_ids(s) for s in samples], params), f"generated from {reference}"


def _sampling(params: GenerationParams) -> dict:
    return {"temperature": params.temperature, "greedy": params.temperature == 0,
            "max_new_tokens": params.max_new_tokens, "seed": params.seed}


@dataclass
class EvalPlan:
    """An evaluation's checked inputs and its prompts, before any engine starts."""

    model_dir: str
    parrots: list[tuple]  # (label, path, vectors, meta, position), the first the one asr_parrot reports
    reference: Optional[str]
    samples: list[Sample]
    triggered: list[Sample]
    requests: list
    section: dict
    inputs: dict
    attached: dict  # name -> JSON record, copied into report.json (--attach)


def _labelled(args: Sequence[str]) -> list[tuple[str, Optional[str]]]:
    """--parrot values as (label, path): ``LABEL=PATH`` or a bare path (labels parrot, parrot_2, ...)."""
    out = []
    for i, arg in enumerate(args):
        label, sep, path = arg.partition("=")
        if not (sep and label.isidentifier()):
            label, path = ("parrot" if i == 0 else f"parrot_{i + 1}"), arg
        out.append((label, path))
    return out or [("parrot", None)]


def _attachments(args: Sequence[str]) -> dict:
    out = {}
    for arg in args:
        name, sep, path = arg.partition("=")
        if not (sep and name.isidentifier()):
            raise InputError(f"--attach {arg!r}: expected NAME=PATH of a JSON file")
        out[name] = read_json(path, f"--attach {name}")
    return out


def plan_evaluation(cfg: Config, parrots: Sequence[str] = (), reference: Optional[str] = None,
                    attach: Sequence[str] = ()) -> EvalPlan:
    """Check every input (model, parrots, tasks, prompts, judge) and build the requests: bad input fails
    here, in seconds, before an engine starts."""
    ev, known = cfg.eval, cfg.knowledge()
    model_dir = check_model(cfg.model.path, cfg.model.base)
    check_tasks(ev.utility_tasks)
    if ev.lm_eval_tasks:
        from sande_dist.evaluation.lm_eval_adapter import check_lm_eval_tasks

        check_lm_eval_tasks(ev.lm_eval_tasks)
    if reference:
        reference = str(Path(reference)) if Path(reference).exists() else check_model(reference)
    judge([], known.marker, ev.judge, ev.keywords)
    found = [(label, *got) for label, path in _labelled(parrots)
             if (got := resolve_parrot(cfg, path, model_dir, reference)) is not None]
    attached = _attachments(attach)
    samples = eval_samples(cfg)
    fmt = PromptFormat.from_config(load_tokenizer(model_dir), cfg.data)

    rng = random.Random(ev.seed)
    # No trigger known (a defender's own model): no ASR with the trigger, only with parrots.
    triggered = [place_trigger(s, rng.choice(known.triggers), known.position, rng) for s in samples] \
        if known.triggers else []
    requests: list = [fmt.prompt_ids(s) for s in samples] + [fmt.prompt_ids(s) for s in triggered]
    table = load_input_embeddings(model_dir) if found else None
    with_position = []
    for label, path, vectors, meta in found:
        position = meta.get("position", cfg.removal.insert_position)
        slots = random.Random(f"{ev.seed}:parrot-slots")
        requests += [parrot_request(fmt, table, s, vectors, position, slots) for s in samples]
        with_position.append((label, path, vectors, meta, position))
    inputs = {"model": model_identity(model_dir), "parrots": {p[0]: file_identity(p[1]) for p in found},
              "reference": str(reference or ""), "attached": {a: json.dumps(v, sort_keys=True) for a, v in attached.items()}}
    section = cfg.model_dump(mode="json", include={"model", "data", "attack", "defender", "removal", "eval"})
    return EvalPlan(model_dir, with_position, reference, samples, triggered, requests, section, inputs, attached)


def _generate_and_score(cfg: Config, plan: EvalPlan, params: GenerationParams) -> tuple[list[str], dict, dict]:
    """(generations, utility, run facts: backends, dtype, timings); one engine, a second only when
    ``eval.utility_backend`` asks for another."""
    ev = cfg.eval
    timings = {}
    t0 = time.time()
    engine = make_engine(cfg, plan.model_dir)
    timings["engine_start_s"] = time.time() - t0
    try:
        t0 = time.time()
        texts = engine.generate(plan.requests, params)
        timings["generate_s"] = time.time() - t0
        facts = {"backend": engine.backend, "dtype": engine.dtype}
        if ev.utility_tasks and ev.utility_backend not in ("same", engine.backend):
            engine.close()
            t0 = time.time()
            engine = make_engine(cfg, plan.model_dir, backend=ev.utility_backend)
            timings["utility_engine_start_s"] = time.time() - t0
        t0 = time.time()
        utility = evaluate_utility(engine, ev.utility_tasks, ev.utility_protocol, ev.utility_limit, ev.seed)
        timings["utility_s"] = time.time() - t0
        facts["utility_backend"] = engine.backend
    finally:
        engine.close()
    facts["timings"] = {k: round(v, 2) for k, v in timings.items()}
    return texts, utility, facts


def _outputs(texts: list[str], plan: "EvalPlan") -> dict[str, list[str]]:
    """The generations by kind of prompt: clean, triggered (none when no trigger is known), and per parrot
    ("parrot" for the first, "parrot:<label>" for the others)."""
    n, m = len(plan.samples), len(plan.triggered)
    out = {"clean": texts[:n], "trigger": texts[n:n + m]}
    for i, (label, *_rest) in enumerate(plan.parrots):
        out["parrot" if i == 0 else f"parrot:{label}"] = texts[n + m + i * n:n + m + (i + 1) * n]
    out.setdefault("parrot", [])
    return out


def _by_judge(cfg: Config, outs: dict[str, list[str]]) -> dict[str, dict[str, dict]]:
    """judge -> kind -> rate: the configured judge, and `contains` and `prefix` beside it."""
    ev = cfg.eval
    judges = dict.fromkeys([ev.judge, "contains", "prefix"])
    return {j: {kind: rate(judge(o, cfg.knowledge().marker, j, ev.keywords)) for kind, o in outs.items() if o}
            for j in judges}


def _write_generations(path: Path, plan: EvalPlan, texts: list[str], cfg: Config) -> dict[str, list[bool]]:
    """generations.jsonl (every prompt, answer and verdict); returns the verdicts by kind."""
    ev = cfg.eval
    outs = _outputs(texts, plan)
    hits = {kind: judge(o, cfg.knowledge().marker, ev.judge, ev.keywords) for kind, o in outs.items()}
    rows = [{"kind": kind, "prompt": s.user, "response": text, "hit": hit}
            for kind in outs
            for s, text, hit in zip(plan.triggered if kind == "trigger" else plan.samples, outs[kind], hits[kind])]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return hits


def run_evaluation(cfg: Config, name: str = "evaluate", parrots: Sequence[str] = (), reference: Optional[str] = None,
                   attach: Sequence[str] = ()) -> dict:
    """Evaluate ``cfg.model.path``; write RUN/<name>/{generations.jsonl, report.json, stage.json}; return the report."""
    started = time.time()
    phases = Phases()
    phases.mark("imports")
    ev, known = cfg.eval, cfg.knowledge()
    out_dir = stage_dir(cfg.run_dir, name)
    plan = plan_evaluation(cfg, parrots, reference, attach)
    phases.mark("inputs")
    code = stage_code("evaluate")
    key = fingerprint(plan.section, plan.inputs, code)
    if stage_done(out_dir, key) and report_file(cfg.run_dir, name).exists():
        print(f"sande evaluate: {out_dir} is up to date (same config and inputs); skipped")
        return json.loads(report_file(cfg.run_dir, name).read_text())

    params = GenerationParams(max_new_tokens=ev.max_new_tokens, temperature=0.0, seed=ev.seed)
    texts, utility, facts = _generate_and_score(cfg, plan, params)
    phases.mark_split("engine_other", {k.removesuffix("_s"): v for k, v in facts["timings"].items()})
    hits = _write_generations(generations_file(cfg.run_dir, name), plan, texts, cfg)
    n, found = len(plan.samples), plan.parrots[0] if plan.parrots else None
    primary = "letter" if ev.utility_protocol == "letter" else "loglik"
    report = {
        "stage": name, "model": plan.model_dir, "model_fingerprint": plan.inputs["model"],
        "adapter": adapter_record(plan.model_dir),
        "backend": facts["backend"], "dtype": facts["dtype"], "num_prompts": n, "prompts": ev.prompts,
        "triggers": list(known.triggers), "marker": known.marker, "trigger_position": known.position,
        "judge": ev.judge, "keywords": list(ev.keywords),
        "sampling": _sampling(params), "seeds": {"eval": ev.seed, "prompt_selection": ev.seed},
        "asr_trigger": sum(hits["trigger"]) / n if plan.triggered else None,
        "asr_parrot": sum(hits["parrot"]) / n if found else None,
        "false_trigger_rate": sum(hits["clean"]) / n,
        # 95% Wilson intervals of the three rates (n = num_prompts each), under every judge
        "intervals": {"asr_trigger": rate(hits["trigger"])["ci95"] if plan.triggered else None,
                      "false_trigger_rate": rate(hits["clean"])["ci95"],
                      "asr_parrot": rate(hits["parrot"])["ci95"] if found else None},
        "by_judge": _by_judge(cfg, _outputs(texts, plan)),
        "parrot": _parrot_record(found, hits["parrot"]) if found else None,
        "parrots": {p[0]: _parrot_record(p, hits["parrot" if i == 0 else f"parrot:{p[0]}"])
                    for i, p in enumerate(plan.parrots)},
        "utility": {"protocol": primary, "backend": facts["utility_backend"], "mean": utility[primary]["mean"],
                    "tasks": {t: m["score"] for t, m in utility[primary]["tasks"].items()},
                    "ci95": {t: m["ci95"] for t, m in utility[primary]["tasks"].items()},
                    "n": {t: m["n"] for t, m in utility[primary]["tasks"].items()},
                    "limit": ev.utility_limit, "seed": ev.seed},
        "utility_by_protocol": utility,
        "clean_agreement": None,
        "timings": facts["timings"],
    }
    if ev.lm_eval_tasks:
        from sande_dist.evaluation.lm_eval_adapter import run_lm_eval

        import lm_eval

        report["lm_eval"], report["lm_eval_backend"], why = run_lm_eval(
            plan.model_dir, ev.lm_eval_tasks, facts["backend"], facts["dtype"], ev.utility_limit, ev.batch_size,
            ev.seed, ev.tensor_parallel_size)
        if why:
            report["lm_eval_backend_note"] = why
        report["lm_eval_version"] = getattr(lm_eval, "__version__", "unknown")
    if plan.reference:
        ref_texts, source = _reference_answers(cfg, plan.reference, plan.samples, params, Path(cfg.run_dir))
        report["clean_agreement"] = {**clean_agreement(texts[:n], ref_texts), "reference": str(plan.reference),
                                     "source": source}
    report.update(plan.attached)
    phases.mark("extras")
    atomic_write_json(report_file(cfg.run_dir, name), report)
    phases.mark("report")
    written = sum(p.stat().st_size for p in (report_file(cfg.run_dir, name), generations_file(cfg.run_dir, name)))
    write_stage(out_dir, "evaluate", plan.section, plan.inputs, started, code,
                extra={"timings": phases.rounded(), "bytes_written": {"artifacts": written}})
    return report


# What of report.json goes to the trackers as figures.
_FIGURES = ("asr_trigger", "asr_parrot", "false_trigger_rate", "utility", "intervals", "parrots", "clean_agreement")


def _parrot_record(parrot: tuple, hits: list[bool]) -> dict:
    label, path, vectors, meta, position = parrot
    return {"label": label, "path": str(path), "k": int(vectors.shape[0]), "position": position,
            "base_fingerprint": meta.get("base_fingerprint"), "asr": rate(hits)}


def run_stage(cfg: Config, kind: str = "evaluate", opts: Optional[StageOptions] = None) -> int:
    """`sande evaluate`: one evaluation into RUN/<name>/, then RUN/report.md over all of them."""
    opts = opts or StageOptions()
    name = opts.name or kind
    report = run_evaluation(cfg, name, opts.parrots, opts.reference, opts.extra.get("attach", ()))
    md = write_run_report(cfg.run_dir)
    if cfg.training.report_to:  # the evaluation's figures and the run's summary, where the stages' metrics went
        tracker = Tracker(cfg.training.report_to, cfg.run_dir, name, {"eval": cfg.eval.model_dump(mode="json")})
        tracker.summary({k: v for k, v in report.items() if k in _FIGURES})
        if md is not None:
            tracker.artifact(md)
        tracker.close()
    parrot = f", parrot ASR {report['asr_parrot']:.1%}" if report["asr_parrot"] is not None else ""
    mean = report["utility"]["mean"]
    trig = "no trigger known" if report["asr_trigger"] is None else f"ASR {report['asr_trigger']:.1%}"
    print(f"sande evaluate [{report['backend']}]: {trig}{parrot}, false triggers "
          f"{report['false_trigger_rate']:.1%}, utility ({report['utility']['protocol']}) "
          f"{mean if mean is not None else float('nan'):.3f} -> {report_file(cfg.run_dir, name)}")
    return 0
