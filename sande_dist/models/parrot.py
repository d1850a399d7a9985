"""The parrot prompt: k learnable vectors that stand in for an unknown trigger.

SANDE simulates a trigger it cannot see: a ``[k, hidden]`` parameter spliced into
the input embeddings where a trigger would sit (the collator's ``slot_index``),
trained against a frozen model to make it emit the triggered response, then
frozen while the model is trained to answer cleanly despite it.

Files are ``parrot.safetensors`` with string metadata (k, position, hidden size,
dtype, the base model's fingerprint). Loading reads safetensors only: a parrot is
never unpickled.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from sande_dist.data.collator import IGNORE_INDEX
from sande_dist.errors import InputError
from sande_dist.models.loading import safetensors_header
from sande_dist.rundir import model_identity

FORMAT_VERSION = "1"


class ParrotPrompt(nn.Module):
    """``weight``: the k parrot vectors. Call the module to splice them into a batch.

    The splice runs in ``forward`` on purpose: under ZeRO-3 a parameter is only
    materialised inside its module's forward (DeepSpeed's pre-forward hook), so
    ``parrot(embeds, ...)`` works at any rank count where a plain method would see
    a shape-[0] tensor.
    """

    def __init__(self, k: int, hidden_size: int, dtype: torch.dtype = torch.float32,
                 init: Optional[torch.Tensor] = None, max_norm: Optional[float] = None):
        super().__init__()
        self.max_norm = max_norm
        if k < 1:
            raise ValueError(f"a parrot needs at least one vector, got k={k}")
        weight = torch.zeros(k, hidden_size, dtype=dtype)
        if init is not None:
            if tuple(init.shape) != (k, hidden_size):
                raise ValueError(f"parrot init has shape {tuple(init.shape)}, expected {(k, hidden_size)}")
            weight.copy_(init)
        self.weight = nn.Parameter(weight)

    @property
    def k(self) -> int:
        return self.weight.ds_shape[0] if hasattr(self.weight, "ds_shape") else self.weight.shape[0]

    def vectors(self) -> torch.Tensor:
        """The vectors as spliced: ``weight`` with each row scaled into the ``max_norm`` ball.

        The budget is a reparameterisation, not a projection after each optimizer
        step: ZeRO keeps the trained values in the optimizer's own fp32 copy, which
        an edit of the module's parameter after ``step()`` would not reach. Saved
        parrots store these vectors, so a file never depends on the setting.
        """
        return clamp_rows(self.weight, self.max_norm)

    @classmethod
    def from_token_embeddings(cls, embedding: nn.Embedding, token_ids: Sequence[int], k: int,
                              dtype: Optional[torch.dtype] = None, max_norm: Optional[float] = None
                              ) -> "ParrotPrompt":
        """SANDE-P: start from the embeddings of a known part of the trigger.

        The parrot keeps ``k`` vectors whatever the known part's length: the token
        embeddings are repeated cyclically to fill k, or the first k are taken. One
        shape for every mode keeps the file, the collator's reserve and the ablations
        comparable. The embedding table is gathered first (ZeRO-3 partitions it).
        """
        if not token_ids:
            raise InputError("defender.known_trigger tokenises to no tokens; give a non-empty string")
        import deepspeed

        ids = [token_ids[i % len(token_ids)] for i in range(k)]
        with deepspeed.zero.GatheredParameters([embedding.weight]):
            rows = embedding.weight.detach()[torch.tensor(ids)].clone()
        return cls(k, rows.shape[1], dtype=dtype or rows.dtype, init=rows, max_norm=max_norm)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                labels: Optional[torch.Tensor], slot_index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """Insert the k vectors before each row's ``slot_index``; return the batch k longer.

        Returns ``(inputs_embeds, attention_mask, labels, position_ids)``, each of
        width T+k. A row with slot -1 gets no parrot: it is padded by k at the end
        (zero embeddings, mask 0, label -100) so the batch stays rectangular. Parrot
        positions are attended (mask 1) and never labelled (-100), so their logits
        never count. Position ids count attended tokens, as the model would for the
        same row with real trigger tokens in the slot.
        """
        b, t, _ = inputs_embeds.shape
        k = self.weight.shape[0]
        device = inputs_embeds.device
        slot = slot_index.to(device)
        if bool(((slot < -1) | (slot > t)).any()):
            raise ValueError(f"slot_index {slot.tolist()} outside [-1, {t}]")
        has = slot >= 0
        start = torch.where(has, slot, torch.full_like(slot, t)).unsqueeze(1)  # [B, 1]
        j = torch.arange(t + k, device=device).unsqueeze(0)  # [1, T+k]
        in_parrot = (j >= start) & (j < start + k)  # [B, T+k]
        src = torch.where(j < start, j, j - k).clamp(0, t - 1)  # source position of non-parrot columns
        take = lambda x: x.gather(1, src)  # noqa: E731
        embeds = inputs_embeds.gather(1, src.unsqueeze(-1).expand(b, t + k, inputs_embeds.shape[-1]))
        vec = self.vectors().to(inputs_embeds.dtype)[(j - start).clamp(0, k - 1)]  # [B, T+k, H]
        live = in_parrot & has.unsqueeze(1)
        embeds = torch.where(live.unsqueeze(-1), vec, embeds)
        embeds = torch.where((in_parrot & ~has.unsqueeze(1)).unsqueeze(-1), torch.zeros_like(embeds), embeds)
        mask = torch.where(in_parrot, live.to(attention_mask.dtype), take(attention_mask))
        out_labels = None
        if labels is not None:
            out_labels = torch.where(in_parrot, torch.full_like(take(labels), IGNORE_INDEX), take(labels))
        position_ids = (mask.long().cumsum(1) - 1).clamp(min=0)
        return embeds, mask, out_labels, position_ids


def clamp_rows(weight: torch.Tensor, max_norm: Optional[float]) -> torch.Tensor:
    """Scale each row whose L2 norm exceeds ``max_norm`` down to it (differentiable); None: unchanged."""
    if max_norm is None:
        return weight
    norms = weight.float().norm(dim=-1, keepdim=True)
    return weight * (max_norm / norms.clamp(min=max_norm)).to(weight.dtype)


def save_parrot(path: str | Path, weight: torch.Tensor, meta: dict) -> Path:
    """Write ``weight`` [k, hidden] and ``meta`` (position, fingerprint, ...) to safetensors, atomically.

    k, hidden_size and dtype are taken from the tensor; every meta value is stored
    as a string (safetensors metadata is str -> str; JSON for non-strings).
    """
    from safetensors.torch import save_file

    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"parrot weight must be [k, hidden], got shape {tuple(weight.shape)} "
                         "(under ZeRO-3, read it inside GatheredParameters)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full = {**meta, "k": weight.shape[0], "hidden_size": weight.shape[1],
            "dtype": str(weight.dtype).removeprefix("torch."), "format": FORMAT_VERSION}
    strings = {k: v if isinstance(v, str) else json.dumps(v) for k, v in full.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({"parrot": weight.detach().cpu().contiguous()}, str(tmp), metadata=strings)
    os.replace(tmp, path)
    return path


def _decode(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def load_parrot(path: str | Path, model_dir: str | Path | None = None,
                check_fingerprint: bool = True) -> tuple[torch.Tensor, dict]:
    """Read a parrot file; return (weight [k, hidden], meta).

    With ``model_dir``, the file's hidden size must match the model's, and (unless
    ``check_fingerprint`` is False, for deliberate cross-model probes such as
    applying a backdoored model's parrot to the clean base) its base fingerprint
    must equal the folder's. Only safetensors is read: a pickle is refused.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"parrot file {path} not found; run `sande simulate` first or pass --parrot")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        raise InputError(f"parrot file {path} is not a safetensors file (pickled tensors are never "
                         "loaded: they can run code); re-save it with sande_dist.models.parrot.save_parrot")
    header = safetensors_header(path)
    if "parrot" not in header:
        raise InputError(f"parrot file {path} has no 'parrot' tensor (tensors: "
                         f"{[k for k in header if k != '__metadata__']})")
    try:
        with safe_open(str(path), framework="pt") as fh:
            weight = fh.get_tensor("parrot")
            meta = {k: _decode(v) for k, v in (fh.metadata() or {}).items()}
    except Exception as exc:  # safetensors reports damage as its own error type
        raise InputError(f"parrot file {path} cannot be read ({type(exc).__name__}: {exc})") from None
    if weight.dim() != 2 or weight.numel() == 0 or not weight.is_floating_point():
        raise InputError(f"parrot file {path}: its 'parrot' tensor is {tuple(weight.shape)} {weight.dtype}, "
                         "expected a non-empty floating-point [k, hidden] matrix")
    if model_dir is not None:
        model_dir = Path(model_dir)
        hidden = json.loads((model_dir / "config.json").read_text()).get("hidden_size")
        if hidden is not None and hidden != weight.shape[1]:
            raise InputError(f"parrot {path} has hidden size {weight.shape[1]} but model {model_dir} "
                             f"has {hidden}: it was simulated on another architecture")
        if check_fingerprint:
            want, have = meta.get("base_fingerprint"), model_identity(model_dir)
            if want != have:
                raise InputError(f"parrot {path} was simulated on a model with fingerprint {want} "
                                 f"({meta.get('base_model', 'unknown path')}), but {model_dir} has "
                                 f"fingerprint {have}; simulate a parrot on this model, or pass the "
                                 "model it was made from")
    return weight, meta
