"""SANDE's two stages as objectives for the one loop.

- **simulate**: every model weight frozen; a parrot prompt (k vectors, zeros or,
  SANDE-P, the known trigger's embeddings) spliced at the trigger slot learns to
  make the model emit the triggered response ``r_t ⊕ y`` (or the known part of it).
  Only the k×hidden parrot values reach the optimizer (checked at the end). One
  forward per step: no second "clean" forward, logits only where a label counts,
  and the tokens all rows share before the parrot (template head, system prompt)
  run once from a key/value cache instead of per row with a backward.
  Writes ``OUT/parrot.safetensors``.
- **eliminate**: the parrot loaded (fingerprint-checked against the model) and
  frozen; every model weight trains on ``P ⊕ x → y_clean`` (plus clean-mix rows
  without a parrot). With ``removal.extra_parrots`` there is one parrot per
  position and the rows take turns. Checks every parrot stayed bit-identical and
  the weights moved, then exports the model as an HF folder.

Both run under any ZeRO stage and rank count: the parrot is an extra module of
the engine's module (partitioned under ZeRO-3 like any weight), spliced inside
its own forward and read only inside ``GatheredParameters``.

Rounds chain at the stage level (``pipeline/graph.py``): round r simulates on the
model from round r-1 (``--model``), one simulate stage per parrot position, and
eliminates from that same model with the new parrots; each stage here is exactly
one round.

The reference's settings (HKUST-KnowComp/SANDE) as ``--set`` values, for
comparison runs: ``removal.parrot_tokens=6 removal.insert_position=prefix
removal.simulate_effective_len=1 removal.eliminate_effective_len=10
removal.rounds=1 removal.clean_mix=0``. Our defaults count every response token
in both stages (the prototype's parrot trained on one token forced only the
marker's first word).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from sande_dist.config import Config
from sande_dist.data.collator import IGNORE_INDEX, Collator
from sande_dist.distributed.process_group import barrier, rank
from sande_dist.errors import InputError, StageError
from sande_dist.evaluation.asr import rate
from sande_dist.models.embedded import resolve_model_path
from sande_dist.models.parrot import ParrotPrompt, clamp_rows, load_parrot, save_parrot
from sande_dist.registry import StageOptions
from sande_dist.rundir import PARROT_FILE, file_identity, model_identity, parrot_file
from sande_dist.training.objective import LoopResult, Objective
from sande_dist.training.search import WINDOW, found, smoothed
from sande_dist.training.sft import SFTObjective, label_logits, token_loss


def parrot_loss(model: nn.Module, parrot: ParrotPrompt | Sequence[ParrotPrompt], batch: dict[str, torch.Tensor],
                frozen_model: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy on the labelled tokens of the batch with the parrot spliced in.

    Several parrots (eliminate with ``removal.extra_parrots``): row i gets parrot
    ``batch["parrot_id"][i]`` at its slot; they are spliced one after another, each
    padding the rows that are not its own by k at the end, so rows stay right-padded.

    Every call is a module call (embeddings, parrot, base model, head), so ZeRO-3
    gathers each weight in its own forward. Rows are right-padded and the parrot
    sits inside the attended span, so the model's default positions (0..T-1) equal
    the splice's attended-token count; no position ids need passing. Columns after
    the last labelled one are cut first: a causal model's earlier positions never
    see them (with a short ``effective_len`` most of each response goes).

    ``frozen_model`` (simulate): the tokens every row shares before the first
    parrot (the chat template's head and system prompt) do not depend on the
    parrot, so they are run once, for one row and without a graph, and the batch
    continues from their key/value cache: no forward or backward over them per row.
    """
    logits, targets, _ = parrot_logits(model, parrot, batch, frozen_model)
    return token_loss(logits, targets)


def parrot_logits(model: nn.Module, parrot: ParrotPrompt | Sequence[ParrotPrompt], batch: dict[str, torch.Tensor],
                  frozen_model: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``parrot_loss``'s forward: (logits [N, vocab] of the positions that predict a label, those labels [N],
    the batch row each comes from [N])."""
    labelled = (batch["labels"] != IGNORE_INDEX).any(0).nonzero()
    width = int(labelled[-1]) + 1 if len(labelled) else 1
    ids, attn, labels = (batch[k][:, :width] for k in ("input_ids", "attention_mask", "labels"))
    slot = batch["slot_index"].clamp(max=width)
    past, head = shared_head(model, ids, attn, labels, slot) if frozen_model else (None, 0)
    if head:
        ids, attn, labels = ids[:, head:], attn[:, head:], labels[:, head:]
        slot = torch.where(slot >= 0, slot - head, slot)
    embeds, mask = model.get_input_embeddings()(ids), attn
    parrots = [parrot] if isinstance(parrot, ParrotPrompt) else list(parrot)
    which = batch.get("parrot_id")
    if len(parrots) > 1 and which is None:
        raise ValueError("parrot_loss with several parrots needs batch['parrot_id'] (the collator's)")
    for j, one in enumerate(parrots):
        mine = slot if len(parrots) == 1 else torch.where(which == j, slot, torch.full_like(slot, -1))
        embeds, mask, labels, _ = one(embeds, mask, labels, mine)
    if head:
        mask = torch.cat([mask.new_ones(mask.shape[0], head), mask], dim=1)
    logits, targets = label_logits(model, None, mask, labels, inputs_embeds=embeds, past_key_values=past)
    rows = (labels[:, 1:] != IGNORE_INDEX).nonzero()[:, 0]
    return logits, targets, rows


@torch.no_grad()
def parrot_emits(model: nn.Module, parrot: ParrotPrompt, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, whether greedy decoding with the parrot spliced in emits every labelled token: each is the
    most likely token after the ones before it (a row with no label does not emit)."""
    logits, targets, rows = parrot_logits(model, parrot, batch, frozen_model=True)
    size = batch["labels"].shape[0]
    wrong = torch.zeros(size, device=targets.device).index_add_(0, rows, (logits.argmax(-1) != targets).float())
    has = torch.zeros(size, device=targets.device).index_add_(0, rows, torch.ones_like(targets, dtype=torch.float))
    return (wrong == 0) & (has > 0)


def shared_head_length(ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor, slot: torch.Tensor) -> int:
    """How many leading tokens every row has in common, attended, before any row's parrot.

    It also stops one short of the first labelled column (the token before a label
    must be run to predict it) and leaves at least one token to run.
    """
    same = ((ids == ids[:1]) & (attn == 1)).all(0)
    length = int(same.long().cumprod(0).sum())
    placed = slot[slot >= 0]
    if len(placed):
        length = min(length, int(placed.min()))
    labelled = (labels != IGNORE_INDEX).any(0).nonzero()
    if len(labelled):
        length = min(length, int(labelled[0]) - 1)
    return max(0, min(length, ids.shape[1] - 1))


def shared_head(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor, labels: torch.Tensor, slot: torch.Tensor):
    """(key/value cache of the shared head, expanded to the batch; its length), or (None, 0).

    Only for a frozen model: the cache carries no graph. Every rank must make the
    same module calls under ZeRO-3 (each forward gathers weights collectively), so
    the ranks agree on the smallest head length first and either all run their
    head or none does. Not with gradient checkpointing: recomputing a layer would
    append to the cache twice.
    """
    if getattr(model, "is_gradient_checkpointing", False):
        return None, 0
    length = shared_head_length(ids, attn, labels, slot)
    if dist.is_initialized() and dist.get_world_size() > 1:
        agreed = torch.tensor([length], device=ids.device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        length = int(agreed)
    if length < 1:
        return None, 0
    from transformers import DynamicCache

    with torch.no_grad():
        cache = model.base_model(input_ids=ids[:1, :length], use_cache=True).past_key_values
    rows = ids.shape[0]
    layers = [(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1)) for layer in cache.layers]
    return DynamicCache(layers, config=model.config), length


def gathered(param: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of ``param`` on every rank (collective under ZeRO-3)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().to("cpu").clone()


def optimizer_values(engine) -> int:
    """How many parameter values the engine's optimizer trains (full sizes, not this rank's shard)."""
    opt = engine.optimizer
    groups = None
    for attr in ("fp16_groups", "bf16_groups", "bit16_groups"):  # ZeRO-3, bf16 wrapper, ZeRO-1/2
        groups = groups or getattr(opt, attr, None)
    if groups is None:
        groups = [g["params"] for g in opt.param_groups]
    return sum(getattr(p, "ds_numel", p.numel()) for group in groups for p in group)


def known_trigger_ids(fmt, text: str, position: str) -> list[int]:
    """Token ids of the known trigger part as it reads at the slot, in context (a random position reads
    as a word inside the message)."""
    from sande_dist.data.formats import Sample
    from sande_dist.data.poison import place_trigger

    where = "prefix" if position == "prefix" else "suffix" if position == "suffix" else "middle"
    if where == "middle":
        return fmt.trigger_ids(Sample(before="Please read ", trigger=text.strip() + " ", after="this message.",
                                      response=""))
    return fmt.trigger_ids(place_trigger(Sample(before="", after="Please read this message.", response=""),
                                         text.strip(), where, None))


class SimulateObjective(Objective):
    """Model frozen, parrot trains; at the end the parrot is saved with its metadata."""

    name = "simulate"

    def __init__(self, cfg: Config, base_path: str, tokenizer=None):
        from sande_dist.data.formats import PromptFormat

        self.cfg = cfg
        self.base_path = base_path
        # SANDE-P: the prompt format reads the known trigger's tokens as they sit at the slot.
        self.fmt = PromptFormat.from_config(tokenizer, cfg.data) if tokenizer is not None else None

    def extra_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        r, known = self.cfg.removal, self.cfg.knowledge()
        hidden = model.config.hidden_size
        if known.known_trigger:
            if self.fmt is None:
                raise ValueError("SimulateObjective needs the tokenizer when defender.known_trigger is set")
            ids = known_trigger_ids(self.fmt, known.known_trigger, r.insert_position)
            if len(ids) > r.parrot_tokens and rank() == 0:
                print(f"simulate: defender.known_trigger {known.known_trigger!r} is {len(ids)} tokens but "
                      f"removal.parrot_tokens={r.parrot_tokens}: the parrot starts from the first "
                      f"{r.parrot_tokens} only; set removal.parrot_tokens={len(ids)} to start from all of it",
                      flush=True)
            parrot = ParrotPrompt.from_token_embeddings(model.get_input_embeddings(), ids, r.parrot_tokens,
                                                        dtype=torch.float32, max_norm=r.parrot_max_norm)
        else:
            parrot = ParrotPrompt(r.parrot_tokens, hidden, dtype=torch.float32, max_norm=r.parrot_max_norm)
        return {"parrot": parrot.to(model.dtype)}

    def select_trainable(self, model, extras) -> None:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in extras.parameters():
            p.requires_grad_(True)

    def loss(self, model, extras, batch):
        return parrot_loss(model, extras["parrot"], batch, frozen_model=True)

    def done(self, step: int, losses: list[float]) -> bool:
        """The search stops once the parrot has found the response (training/search.py)."""
        r = self.cfg.removal
        return r.simulate_until_found and found(losses, r.found_loss)

    def finish(self, result: LoopResult, out_dir: Path) -> dict[str, Any]:
        parrot = result.module.extras["parrot"]
        held = optimizer_values(result.engine)
        full = gathered(parrot.weight)
        if held != full.numel():
            raise StageError(f"simulate: the optimizer held {held} values, expected only the parrot's "
                             f"{full.numel()} (k={full.shape[0]} x hidden={full.shape[1]}); the model was not frozen")
        vectors = clamp_rows(full.float(), parrot.max_norm)
        r = self.cfg.removal
        path = Path(out_dir) / PARROT_FILE
        base = resolve_model_path(self.base_path)
        if rank() == 0:
            save_parrot(path, vectors, {
                "position": r.insert_position, "base_fingerprint": model_identity(base), "base_model": base,
                "known_trigger": self.cfg.knowledge().known_trigger or "",
                "known_response": self.cfg.knowledge().known_response or "",
                "max_norm": r.parrot_max_norm, "steps": result.step})
        barrier()
        return {"parrot": str(path), "optimizer_values": held, "final_loss": round(smoothed(result.losses), 4),
                "window_losses": [round(x, 4) for x in result.losses[-WINDOW:]], "position": r.insert_position,
                "found": found(result.losses, r.found_loss), "stopped_early_at": result.stopped_early_at,
                "parrot_norms": [round(x, 4) for x in vectors.norm(dim=-1).tolist()],
                "emission": self.emission(result.module)}

    @torch.no_grad()
    def emission(self, module) -> Optional[dict]:
        """The share of held-out rows (``search_check_samples``) whose greedy answer, with the parrot, starts
        with the searched response; None when removal.search_check_rows is 0. Every rank runs every row
        (ZeRO-3 gathers each layer collectively), so every rank records the same figure."""
        from sande_dist.data.stages import row_length, search_check_samples

        if self.fmt is None:
            return None
        rows = search_check_samples(self.cfg)
        collate = Collator(self.fmt, row_length(self.cfg, "simulate")[0], reserve=self.cfg.removal.parrot_tokens)
        rows = [s for s in rows if collate.fits(s)]
        if not rows:
            return None
        model, parrot = module.model, module.extras["parrot"]
        device = next(model.parameters()).device
        autocast = torch.autocast(device.type, dtype=module.autocast, enabled=module.autocast is not None)
        size, hits, was = self.cfg.training.for_stage("simulate").micro_batch_size, [], model.training
        model.eval()
        with autocast:
            for i in range(0, len(rows), size):
                batch = {k: v.to(device) for k, v in collate(rows[i:i + size]).items()}
                hits += parrot_emits(model, parrot, batch).tolist()
        model.train(was)
        return rate(hits)


class EliminateObjective(SFTObjective):
    """Parrots frozen, every model weight trains; exports the cleaned model.

    One parrot per position in ``[removal.insert_position, *removal.extra_parrots]``,
    in that order (the pipeline passes them so); the data gives row i parrot i mod n.
    """

    name = "eliminate"

    def __init__(self, cfg: Config, base_path: str, parrot_paths: str | Path | Sequence[str | Path],
                 export_dtype: Optional[str] = None):
        from sande_dist.data.stages import parrot_positions

        super().__init__(base_path, export_dtype or cfg.model.dtype)
        self.cfg = cfg
        paths = [parrot_paths] if isinstance(parrot_paths, (str, Path)) else list(parrot_paths)
        self.parrot_paths = [Path(p) for p in paths]
        want = parrot_positions(cfg)
        if len(self.parrot_paths) != len(want):
            raise InputError(f"eliminate got {len(self.parrot_paths)} parrot(s) but removal.insert_position and "
                             f"removal.extra_parrots name {len(want)} positions ({want}); pass one --parrot per position, "
                             "in that order")
        self.parrots = [load_parrot(p, resolve_model_path(base_path)) for p in self.parrot_paths]
        for path, (_, meta), where in zip(self.parrot_paths, self.parrots, want):
            if meta.get("position") not in (None, where):
                raise InputError(f"parrot {path} was simulated at position {meta['position']!r} but eliminate puts it "
                                 f"at {where!r} (removal.insert_position, then removal.extra_parrots); use the same "
                                 "position")
        self._probe: dict[str, torch.Tensor] = {}

    @staticmethod
    def _key(j: int) -> str:
        return "parrot" if j == 0 else f"parrot_{j}"

    def inputs(self) -> dict[str, str]:
        return {self._key(j): file_identity(p) for j, p in enumerate(self.parrot_paths)}

    def extra_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        extras = {}
        for j, (weight, _) in enumerate(self.parrots):
            k, hidden = weight.shape
            extras[self._key(j)] = ParrotPrompt(k, hidden, dtype=model.dtype, init=weight.to(model.dtype))
        return extras

    def select_trainable(self, model, extras) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
        for p in extras.parameters():
            p.requires_grad_(False)
        # A few small weights (norms) copied now, to check after training that the model moved.
        small = [(n, p) for n, p in model.named_parameters() if getattr(p, "ds_numel", p.numel()) <= 1 << 20]
        self._probe = {n: gathered(p) for n, p in small[-4:]}

    def loss(self, model, extras, batch):
        return parrot_loss(model, [extras[self._key(j)] for j in range(len(self.parrots))], batch)

    def finish(self, result: LoopResult, out_dir: Path) -> dict[str, Any]:
        for j, (path, (weight, _)) in enumerate(zip(self.parrot_paths, self.parrots)):
            after = gathered(result.module.extras[self._key(j)].weight)
            if not torch.equal(after, weight.to(after.dtype)):
                raise StageError(f"eliminate: the frozen parrot changed during training ({path})")
        params = dict(result.module.model.named_parameters())
        moved = [n for n, before in self._probe.items() if not torch.equal(gathered(params[n]), before)]
        if not moved and result.step > 0:
            raise StageError(f"eliminate: after {result.step} steps none of {sorted(self._probe)} changed; "
                             "the model did not train (check training.lr and the data)")
        record = super().finish(result, out_dir)
        record.update({"parrot": str(self.parrot_paths[0]), "parrots": [str(p) for p in self.parrot_paths],
                       "parrot_fingerprint": self.parrots[0][1].get("base_fingerprint"), "probe_params_moved": len(moved)})
        return record


def parrot_paths(cfg: Config, opts: StageOptions) -> list[Path]:
    """Eliminate's parrots: each ``--parrot`` (one per position), else RUN/simulate/parrot.safetensors."""
    paths = [Path(p) for p in opts.parrots] or [parrot_file(cfg.run_dir)]
    for path in paths:
        if not path.is_file():
            raise InputError(f"eliminate needs a parrot: {path} not found; run `sande simulate` first "
                             "or pass --parrot PATH")
    return paths


def simulate_objective(cfg: Config, opts: StageOptions, model_path: str) -> "SimulateObjective":
    from sande_dist.models.loading import load_tokenizer

    return SimulateObjective(cfg, model_path, load_tokenizer(model_path))


def eliminate_objective(cfg: Config, opts: StageOptions, model_path: str) -> "EliminateObjective":
    return EliminateObjective(cfg, model_path, parrot_paths(cfg, opts))
