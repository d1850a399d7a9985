"""`sande generate`: the model's own clean answers to the defender's prompts (``removal.targets: self``).

Writes JSONL rows ``{"prompt": user message, "response": text, "shows_marker": bool}``
(default RUN/generate/targets.jsonl); a row whose answer already shows the marker (the
evaluation's judge) is no clean target, and removal stages leave it out. Work goes in chunks, each written atomically under
RUN/generate/chunks/; a rerun keeps the chunks made with the same settings and
generates only the rest. Responses are greedy and at most ``data.max_length``
new tokens (training cuts longer rows anyway).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

from sande_dist.config import Config
from sande_dist.data.formats import PromptFormat
from sande_dist.data.sources import source_identity
from sande_dist.data.stages import self_target_rows
from sande_dist.evaluation.asr import judge
from sande_dist.generation.engine import GenerationParams
from sande_dist.generation.factory import make_engine
from sande_dist.models.loading import check_model, load_tokenizer
from sande_dist.registry import KINDS, StageOptions
from sande_dist.rundir import (atomic_write_json, atomic_write_text, fingerprint, model_identity, stage_code,
                               stage_dir, targets_file, write_stage)

CHUNK = 256


def run_stage(cfg: Config, kind: str = "generate", opts: Optional[StageOptions] = None) -> int:
    """Generate the clean targets of ``cfg.model.path`` for the training rows; resumable by chunks."""
    started = time.time()
    opts = opts or StageOptions()
    out_dir = stage_dir(cfg.run_dir, opts.name or kind)
    output = Path(opts.output) if opts.output else targets_file(cfg.run_dir)
    model_dir = check_model(cfg.model.path, cfg.model.base)
    samples = self_target_rows(cfg)
    fmt = PromptFormat.from_config(load_tokenizer(model_dir), cfg.data)
    params = GenerationParams(max_new_tokens=cfg.data.max_length, temperature=0.0, seed=cfg.eval.seed)

    section = cfg.model_dump(mode="json", include=set(KINDS[kind].reads))
    inputs = {"model": model_identity(model_dir), "data": source_identity(cfg.data.train)}
    code = stage_code(kind)
    key = fingerprint(section, inputs, code)
    chunks = out_dir / "chunks"
    marker = chunks / "settings.json"
    if not marker.exists() or json.loads(marker.read_text()).get("key") != key:
        shutil.rmtree(chunks, ignore_errors=True)  # made with other settings: start over
        atomic_write_json(marker, {"key": key})
    todo = [i for i in range(0, len(samples), CHUNK) if not (chunks / f"{i:08d}.jsonl").exists()]
    if todo:
        print(f"sande generate: {len(samples)} prompts, {len(todo)} chunk(s) of {CHUNK} to generate")
        with make_engine(cfg, model_dir) as engine:
            for start in todo:
                part = samples[start:start + CHUNK]
                texts = engine.generate([fmt.prompt_ids(s.clean()) for s in part], params)
                hits = judge(texts, cfg.knowledge().marker, cfg.eval.judge, cfg.eval.keywords)
                rows = "".join(json.dumps({"prompt": s.user, "response": t, "shows_marker": h}) + "\n"
                               for s, t, h in zip(part, texts, hits))
                atomic_write_text(chunks / f"{start:08d}.jsonl", rows)
    text = "".join((chunks / f"{i:08d}.jsonl").read_text() for i in range(0, len(samples), CHUNK))
    atomic_write_text(output, text)
    marked = sum(json.loads(line)["shows_marker"] for line in text.splitlines())
    write_stage(out_dir, kind, section, inputs, started, code,
                extra={"output": str(output), "rows": len(samples), "rows_showing_marker": marked})
    print(f"sande generate: {len(samples)} responses -> {output}; {marked} show the marker and are no clean target")
    return 0
