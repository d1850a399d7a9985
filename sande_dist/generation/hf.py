"""The Hugging Face backend: batched, left-padded ``generate`` and one-forward choice scoring.

Every prompt goes in as embeddings (token ids are embedded here), so a parrot
request and a token request take the same path; requests are sorted by length
so a batch carries little padding.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from sande_dist.generation.engine import ChoiceScore, Engine, GenerationParams, Request
from sande_dist.models.loading import DTYPES


# Below this many shared leading tokens a batch is generated without the head cache.
MIN_SHARED_HEAD = 4


def shared_prefix(rows: list[torch.Tensor]) -> int:
    """How many leading positions every row has identical (embeddings), leaving each row at least one."""
    shortest = min(r.shape[0] for r in rows) - 1
    if shortest < 1:
        return 0
    first = rows[0][:shortest]
    same = torch.ones(shortest, dtype=torch.bool)
    for r in rows[1:]:
        same &= (r[:shortest] == first).all(dim=-1)
    return int(same.long().cumprod(0).sum())


def _one_token_each(choices: list[list[int]]) -> bool:
    """Every choice is one token: all are read at the context's last position, nothing is appended."""
    return all(len(c) == 1 for c in choices)


def _row_length(context: list[int], choices: list[list[int]]) -> int:
    return len(context) + (0 if _one_token_each(choices) else sum(map(len, choices)))


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
            # With inputs_embeds alone, generate returns only the new tokens.
            out = self._generate_batch([embeds[i] for i in idx], gen_cfg)
            for b, i in enumerate(idx):
                texts[i] = self._decode(out[b].tolist())
        return texts

    def _generate_batch(self, rows: list[torch.Tensor], gen_cfg) -> torch.Tensor:
        """Generate for one batch; the prompt head every row shares (chat template, system prompt) runs
        once, for one row, and the batch continues from its key/value cache: its rows are laid out
        ``[head | left padding | own tokens]``, positions counting attended tokens only."""
        from transformers import DynamicCache

        head = shared_prefix(rows)
        if head < MIN_SHARED_HEAD:
            x, mask = self._left_pad(rows)
            return self.model.generate(inputs_embeds=x, attention_mask=mask, generation_config=gen_cfg)
        cache = self.model(inputs_embeds=rows[0][None, :head], use_cache=True).past_key_values
        n = len(rows)
        layers = [(layer.keys.expand(n, -1, -1, -1).contiguous(), layer.values.expand(n, -1, -1, -1).contiguous())
                  for layer in cache.layers]
        rest, rest_mask = self._left_pad([r[head:] for r in rows])
        x = torch.cat([rows[0][None, :head].expand(n, -1, -1), rest], dim=1)
        mask = torch.cat([rest_mask.new_ones(n, head), rest_mask], dim=1)
        return self.model.generate(inputs_embeds=x, attention_mask=mask, generation_config=gen_cfg,
                                   past_key_values=DynamicCache(layers, config=self.model.config))

    def _decode(self, ids: list[int]) -> str:
        for n, t in enumerate(ids):
            if t in self.eos_ids:
                ids = ids[:n]
                break
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.inference_mode()
    def score_choices(self, prompts: Sequence[Union[str, list[int]]],
                      choices: Sequence[Sequence[Union[str, list[int]]]]) -> list[list[ChoiceScore]]:
        # One row per prompt. When every choice is one token, the row is the context and all
        # choices are read at its last position. Otherwise the row packs context + choice 1 +
        # ... + choice m, each choice attending to the context and to itself only (a 4D mask,
        # positions restarting after the context): the context is computed once, not m times.
        # Other attention kernels (flash-attention ignores a custom mask) get one row per choice.
        packable = getattr(self.model.config, "_attn_implementation", None) == "sdpa"
        scores: list[list[Optional[ChoiceScore]]] = []
        rows: list[tuple[list[int], list[list[int]], int, int]] = []  # context, choices, prompt, first choice
        for i, (prompt, options) in enumerate(zip(prompts, choices, strict=True)):
            ctx = self._prompt_ids(prompt)
            cont = [self._choice_ids(c) for c in options]
            scores.append([None] * len(cont))
            if packable or _one_token_each(cont):
                rows.append((ctx, cont, i, 0))
            else:
                rows.extend((ctx, [c], i, j) for j, c in enumerate(cont))
        order = sorted(range(len(rows)), key=lambda r: -_row_length(*rows[r][:2]))
        for start in range(0, len(order), self.batch_size):
            batch = [rows[r] for r in order[start:start + self.batch_size]]
            ids, positions, mask, picks, targets = self._pack(batch, packable)
            logp = self._logprobs_at(ids, mask, positions, picks)
            offset = 0
            for (_, cont, i, j0), pos, tgt in zip(batch, picks, targets):
                rows_lp = logp[offset:offset + len(pos)]
                offset += len(pos)
                if not tgt:  # every choice is one token, read at the context's last position
                    for j, c in enumerate(cont, j0):
                        scores[i][j] = ChoiceScore(float(rows_lp[0, c[0]]), 1)
                    continue
                picked = rows_lp.gather(-1, torch.tensor(tgt).unsqueeze(-1)).squeeze(-1)
                at = 0
                for j, c in enumerate(cont, j0):
                    scores[i][j] = ChoiceScore(float(picked[at:at + len(c)].sum()), len(c))
                    at += len(c)
        return scores  # type: ignore[return-value]

    def _pack(self, batch, packed: bool = True):
        """Right-padded ids, position ids, an attention mask ([B, 1, T, T] boolean when ``packed``, else
        [B, T] for rows of one segment), and per row the positions to read and the tokens they predict
        (no targets: every choice's single token is read at one position)."""
        seqs, segs, poss, picks, targets = [], [], [], [], []
        for ctx, cont, _, _ in batch:
            n = len(ctx)
            if _one_token_each(cont):
                seqs.append(ctx), segs.append([0] * n), poss.append(list(range(n)))
                picks.append([n - 1]), targets.append([])
                continue
            seq, seg, pos, pick, tgt = list(ctx), [0] * n, list(range(n)), [], []
            for j, c in enumerate(cont, 1):
                first = len(seq)
                pick += [n - 1] + list(range(first, first + len(c) - 1))
                tgt += c
                seq += c
                seg += [j] * len(c)
                pos += list(range(n, n + len(c)))
            seqs.append(seq), segs.append(seg), poss.append(pos), picks.append(pick), targets.append(tgt)
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        positions = torch.zeros(len(seqs), width, dtype=torch.long)
        seg = torch.full((len(seqs), width), -1, dtype=torch.long)  # -1: padding
        for b, (s, g, p) in enumerate(zip(seqs, segs, poss)):
            ids[b, :len(s)] = torch.tensor(s)
            positions[b, :len(p)] = torch.tensor(p)
            seg[b, :len(g)] = torch.tensor(g)
        if not packed:
            return ids, positions, (seg != -1).long(), picks, targets
        q, k = seg.unsqueeze(2), seg.unsqueeze(1)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        mask = causal & (k != -1) & ((k == 0) | (k == q))
        mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself: no empty softmax rows
        return ids, positions, mask.unsqueeze(1), picks, targets

    def _logprobs_at(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                     picks: list[list[int]]) -> torch.Tensor:
        """Log-softmax rows for the picked positions of each row, concatenated in order.

        The vocabulary projection runs on the picked hidden states only: for a 49k
        vocabulary it is most of the cost of a full-logits forward. Models that
        post-process logits (soft-capping, scaling) take the full-logits path.
        """
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
