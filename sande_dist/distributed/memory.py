"""Measured (not estimated) bytes of model and optimizer state a rank holds."""
from __future__ import annotations

import resource

import torch


def state_bytes(engine) -> dict[str, int]:
    """Bytes of this rank's parameters (its ZeRO-3 shard where partitioned), fp32 master copies and
    optimizer states, counting each storage once; plus the process's peak RSS."""
    seen: set[int] = set()

    def size(t: torch.Tensor) -> int:
        storage = t.untyped_storage()
        if t.numel() == 0 or storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()

    params = sum(size(getattr(p, "ds_tensor", p).data) for p in engine.module.parameters())
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    master = sum(size(p.data) for g in inner.param_groups for p in g["params"])
    states = sum(size(v) for s in inner.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"params": params, "master": master, "optimizer_states": states, "total": params + master + states,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
