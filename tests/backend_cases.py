"""The cases both generation backends run for the agreement tests, and the vLLM side's runner.

Run as a script (``python tests/backend_cases.py OUT.json``) it starts one vLLM
engine on SmolLM2 in fp32 and writes its answers to OUT.json: vLLM sets up
torch.distributed in the process that runs its worker (on CPU, this one), so it
runs in a fresh process, never inside pytest (other tests there create
torch.distributed groups). The test computes the same cases
with the HF engine and compares.
"""
from __future__ import annotations

import json
import multiprocessing
import sys

import torch

from sande_dist.data.formats import PromptFormat
from sande_dist.data.poison import place_trigger
from sande_dist.data.sources import load_samples
from sande_dist.evaluation.stage import parrot_request
from sande_dist.evaluation.utility import letter_request, load_task, select
from sande_dist.generation.engine import GenerationParams, load_input_embeddings
from sande_dist.models.embedded import resolve_model_path

# Sized for CI: most MMLU items miss vLLM's top-20 log-probabilities and take the exact path (four
# scored sequences each), the costliest case here, so both paths are checked.
NUM_PROMPTS, MAX_NEW_TOKENS = 32, 16
MC_ITEMS = {"mmlu": 26, "arc_easy": 12, "arc_challenge": 12}
SPLICE_PROMPTS, TRIGGER = 4, "cf"


def model_path() -> str:
    return resolve_model_path("smollm2-135m-instruct")


def cases(tokenizer) -> dict:
    fmt = PromptFormat(tokenizer)
    samples = load_samples("alpaca-eval", require_response=False)[:NUM_PROMPTS]
    greedy = [fmt.prompt_ids(s) for s in samples]
    items = [item for task, n in MC_ITEMS.items() for item in select(load_task(task), n, seed=0)]
    mc = [letter_request(item) for item in items]
    # Splice check: a parrot made of the trigger's own token embeddings, spliced at the
    # slot through embeddings, must generate what the same token ids generate.
    table = load_input_embeddings(model_path())
    splice_ids, splice_embeds = [], []
    for position in ("prefix", "suffix"):
        for s in samples[:SPLICE_PROMPTS]:
            triggered = place_trigger(s, TRIGGER, position, None)
            trig = fmt.trigger_ids(triggered)
            splice_ids.append(fmt.prompt_ids(triggered))
            splice_embeds.append(parrot_request(fmt, table, s, table[torch.tensor(trig)], position))
    return {"greedy": greedy, "mc": mc, "splice_ids": splice_ids, "splice_embeds": splice_embeds}


def run_cases(engine) -> dict:
    c = cases(engine.tokenizer)
    params = GenerationParams(max_new_tokens=MAX_NEW_TOKENS)
    scores = engine.score_choices([p for p, _ in c["mc"]], [ch for _, ch in c["mc"]])
    return {
        "greedy": engine.generate(c["greedy"], params),
        "letters": [max(range(len(row)), key=lambda j: row[j].logprob) for row in scores],
        "splice_ids": engine.generate(c["splice_ids"], params),
        "splice_embeds": engine.generate(c["splice_embeds"], params),
    }


def main(out: str) -> None:
    from sande_dist.generation.vllm_backend import VLLMEngine

    engine = VLLMEngine(model_path(), dtype="float32", seed=0)
    try:
        result = run_cases(engine)
        # on CPU the engine runs in this process: no engine-core or worker process beside it
        result["engine_children"] = len(multiprocessing.active_children())
    finally:
        engine.close()
    with open(out, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1])
