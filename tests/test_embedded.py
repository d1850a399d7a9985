"""The embedded model: converted once from the packaged GGUF, loadable by plain transformers, offline."""
import os
import subprocess
import sys

import pytest

from sande_dist.assets import cache_dir
from sande_dist.models.embedded import EMBEDDED


@pytest.fixture
def fresh_cache(tmp_path):
    """An empty cache that sees only the packaged GGUF (linked from the real cache)."""
    src = cache_dir() / EMBEDDED["smollm2-135m-instruct"]
    dst = tmp_path / "cache" / EMBEDDED["smollm2-135m-instruct"]
    dst.parent.mkdir(parents=True)
    os.symlink(src, dst)
    return tmp_path / "cache"


def _resolve_in_subprocess(cache):
    code = ("import time; from sande_dist.models.embedded import resolve_model_path as r;"
            "t = time.time(); p = r('smollm2-135m-instruct'); print(p); print(time.time() - t)")
    env = dict(os.environ, SANDE_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    path, seconds = out.stdout.split()[-2:]
    return path, float(seconds)


def test_converts_once_and_loads_offline(fresh_cache):
    path, _ = _resolve_in_subprocess(fresh_cache)
    weights = os.path.join(path, "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    path2, _ = _resolve_in_subprocess(fresh_cache)
    assert path2 == path and os.stat(weights).st_mtime_ns == stamp  # not converted again

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_bad_model_paths(tmp_path):
    from sande_dist.models.embedded import resolve_model_path

    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_model_path(str(tmp_path / "missing"))


def test_tiny_model_shares_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sande_dist.models.embedded import resolve_model_path
    from sande_dist.models.tiny import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "tiny")
    tiny_tok = AutoTokenizer.from_pretrained(folder)
    real_tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    assert tiny_tok.get_vocab() == real_tok.get_vocab()
    assert tiny_tok.chat_template == real_tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
