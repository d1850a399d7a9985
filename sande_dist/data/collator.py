"""One collator for every stage: prompt masked, response labelled, trigger slot located.

Each row is the rendered prompt and its reply tokenized as one text
(``PromptFormat.encode_row``), then the end-of-sequence id when the response is
whole. Labels are -100 on the prompt; with ``effective_len`` only the response's
first tokens are learnt and the row ends after them. ``slot_index`` is the position
of the trigger's first token (or where a parrot is spliced when the trigger is
empty). Rows are right-padded; truncation cuts the response, never the slot.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from sande_dist.data.formats import PromptFormat, Sample

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    slot: int
    prompt_len: int


class Collator:
    def __init__(self, fmt: PromptFormat, max_length: int, effective_len: Optional[int] = None,
                 append_eos: bool = True, reserve: int = 0):
        """``reserve`` leaves room for a parrot of that many vectors within ``max_length``."""
        self.fmt = fmt
        self.max_length = max_length
        self.effective_len = effective_len
        self.append_eos = append_eos
        self.reserve = reserve
        pad = fmt.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else fmt.eos_id

    def encode(self, sample: Sample) -> Encoded:
        ids, n_prompt, slot = self.fmt.encode_row(sample)
        prompt, response = ids[:n_prompt], ids[n_prompt:]
        if self.append_eos and sample.complete and self.fmt.eos_id is not None:
            response = response + [self.fmt.eos_id]
        budget = self.max_length - self.reserve - len(prompt)
        if budget < 1:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room for a response within "
                             f"data.max_length={self.max_length}; raise it or filter long prompts")
        # Past effective_len the row ends: in a causal model the tokens after the last label change
        # neither the loss nor any gradient, so they are not computed at all.
        response = response[:budget if self.effective_len is None else min(budget, self.effective_len)]
        labels = [IGNORE_INDEX] * len(prompt) + list(response)
        return Encoded(prompt + response, labels, slot, len(prompt))

    def fits(self, sample: Sample) -> bool:
        return len(self.fmt.prompt_ids(sample)) < self.max_length - self.reserve

    def __call__(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        rows = [self.encode(s) for s in samples]
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            ids[i, :n] = torch.tensor(r.input_ids)
            labels[i, :n] = torch.tensor(r.labels)
            mask[i, :n] = 1
        slot = torch.tensor([r.slot if s.parrot else -1 for r, s in zip(rows, samples)], dtype=torch.long)
        which = torch.tensor([s.parrot_id for s in samples], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "slot_index": slot, "parrot_id": which}
