"""The Hugging Face backend: batched, left-padded ``generate`` and one-forward choice scoring.

Every prompt goes in as embeddings (token ids are embedded here), so a parrot
request and a token request take the same path; requests are sorted by length
so a batch carries little padding.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from sande_dist.generation.engine import DTYPES, ChoiceScore, Engine, GenerationParams, Request


class HFEngine(Engine):
    backend = "hf"

    def __init__(self, path: str, dtype: str = "float32", batch_size: int = 32,
                 attn_implementation: Optional[str] = None, trust_remote_code: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path, self.dtype, self.batch_size = path, dtype, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], attn_implementation=attn_implementation or "sdpa",
            trust_remote_code=trust_remote_code).eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.embed = self.model.get_input_embeddings()

    def _embeds(self, request: Request) -> torch.Tensor:
        if isinstance(request, torch.Tensor):
            if request.dim() != 2 or request.shape[1] != self.embed.embedding_dim:
                raise ValueError(f"an embeddings request must be [T, {self.embed.embedding_dim}], "
                                 f"got {tuple(request.shape)}")
            return request.to(self.model.dtype)
        return self.embed(torch.tensor(self._prompt_ids(request), dtype=torch.long))

    def _left_pad(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(r.shape[0] for r in rows)
        x = torch.zeros(len(rows), width, rows[0].shape[-1], dtype=rows[0].dtype)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, width - r.shape[0]:] = r
            mask[b, width - r.shape[0]:] = 1
        return x, mask

    @torch.inference_mode()
    def generate(self, requests: Sequence[Request], params: GenerationParams) -> list[str]:
        from transformers import GenerationConfig

        sample = params.temperature > 0
        gen_cfg = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=sample,
            temperature=params.temperature if sample else None, top_p=None, top_k=None,
            repetition_penalty=1.0, eos_token_id=self.eos_ids, pad_token_id=self.pad_id)
        if sample:
            torch.manual_seed(params.seed)
        embeds = [self._embeds(r) for r in requests]
        order = sorted(range(len(embeds)), key=lambda i: -embeds[i].shape[0])
        texts: list[str] = [""] * len(embeds)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            x, mask = self._left_pad([embeds[i] for i in idx])
            # With inputs_embeds alone, generate returns only the new tokens.
            out = self.model.generate(inputs_embeds=x, attention_mask=mask, generation_config=gen_cfg)
            for b, i in enumerate(idx):
                texts[i] = self._decode(out[b].tolist())
        return texts

    def _decode(self, ids: list[int]) -> str:
        for n, t in enumerate(ids):
            if t in self.eos_ids:
                ids = ids[:n]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def score_choices(self, prompts: Sequence[Union[str, list[int]]],
                      choices: Sequence[Sequence[Union[str, list[int]]]]) -> list[list[ChoiceScore]]:
        # A row is (sequence, targets): when every choice of a prompt is one token, one row
        # reads all of them at the next position; otherwise one row per choice reads its tokens.
        rows: list[tuple[list[int], list[int], int, Optional[int]]] = []
        scores: list[list[Optional[ChoiceScore]]] = []
        for i, (prompt, options) in enumerate(zip(prompts, choices, strict=True)):
            ctx = self._prompt_ids(prompt)
            cont = [self._choice_ids(c) for c in options]
            scores.append([None] * len(cont))
            if all(len(c) == 1 for c in cont):
                rows.append((ctx, [c[0] for c in cont], i, None))
            else:
                rows.extend((ctx + c, c, i, j) for j, c in enumerate(cont))
        order = sorted(range(len(rows)), key=lambda r: -len(rows[r][0]))
        for start in range(0, len(order), self.batch_size):
            batch = [rows[r] for r in order[start:start + self.batch_size]]
            x, mask = self._left_pad([torch.tensor(seq).unsqueeze(-1) for seq, _, _, _ in batch])
            ids = x.squeeze(-1).masked_fill(mask == 0, self.pad_id)
            # With left padding the positions that predict the targets end each row.
            width = ids.shape[1]
            picks = [[width - 1] if j is None else list(range(width - len(t) - 1, width - 1)) for _, t, _, j in batch]
            logp = self._logprobs_at(ids, mask, picks)
            offset = 0
            for (_, targets, i, j), pos in zip(batch, picks):
                rows_lp = logp[offset:offset + len(pos)]
                offset += len(pos)
                if j is None:
                    for c, t in enumerate(targets):
                        scores[i][c] = ChoiceScore(float(rows_lp[0, t]), 1)
                else:
                    picked = rows_lp.gather(-1, torch.tensor(targets).unsqueeze(-1))
                    scores[i][j] = ChoiceScore(float(picked.sum()), len(targets))
        return scores  # type: ignore[return-value]

    def _logprobs_at(self, ids: torch.Tensor, mask: torch.Tensor, picks: list[list[int]]) -> torch.Tensor:
        """Log-softmax rows for the picked positions of each row, concatenated in order.

        The vocabulary projection runs on the picked hidden states only: for a 49k
        vocabulary it is most of the cost of a full-logits forward. Models that
        post-process logits (soft-capping, scaling) take the full-logits path.
        """
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        rows = torch.tensor([b for b, pos in enumerate(picks) for _ in pos])
        cols = torch.tensor([p for pos in picks for p in pos])
        cfg = self.model.config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[rows, cols]
        else:
            hidden = self.model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=positions)
            logits = self.model.get_output_embeddings()(hidden.last_hidden_state[rows, cols])
        return torch.log_softmax(logits.float(), dim=-1)

    def close(self) -> None:
        self.model = None
