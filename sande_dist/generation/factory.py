"""The engine a config asks for: ``eval.backend`` (auto, vllm, hf) on a model folder.

Kept apart from the protocol (``engine.py``), which the backends import: the
factory imports the backends, so nothing imports in a circle.
"""
from __future__ import annotations

from typing import Optional

from sande_dist.config import Config
from sande_dist.generation.engine import Engine, pick_dtype, vllm_available
from sande_dist.models.loading import check_model


def backend_for(cfg: Config) -> str:
    """``eval.backend`` with ``auto`` resolved: vLLM when it imports, else HF."""
    backend = cfg.eval.backend
    if backend == "auto":
        backend = "vllm" if vllm_available() else "hf"
    return backend


def make_engine(cfg: Config, model_path: Optional[str] = None, backend: Optional[str] = None) -> Engine:
    """The engine for ``model_path`` (default ``cfg.model.path``); ``backend`` overrides ``eval.backend``.

    Call inside an ``if __name__ == "__main__"`` program: vLLM starts worker processes.
    """
    path = check_model(model_path) if model_path else check_model(cfg.model.path, cfg.model.base)
    ev = cfg.eval
    backend = backend or backend_for(cfg)
    dtype = pick_dtype(ev.dtype, cfg.model.dtype)
    if backend == "vllm":
        from sande_dist.generation.vllm_backend import VLLMEngine

        return VLLMEngine(path, dtype=dtype, seed=ev.seed, tensor_parallel_size=ev.tensor_parallel_size,
                          data_parallel_size=ev.data_parallel_size, trust_remote_code=cfg.model.trust_remote_code)
    from sande_dist.generation.hf import HFEngine

    return HFEngine(path, dtype=dtype, batch_size=ev.batch_size, attn_implementation=cfg.model.attn_implementation,
                    trust_remote_code=cfg.model.trust_remote_code)
