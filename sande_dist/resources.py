"""Files that ship with the package: DeepSpeed presets, Slurm templates, example configs.

In the repository they sit at the top level (``ds_configs/``, ``slurm/``, ``configs/``),
where users look for them and edit them. ``setup.py`` maps each folder into the
package as ``sande_dist/share/<folder>``, so a built wheel carries them; a source
checkout (an editable install) has no ``share/`` and reads the repository's own
folders. Code finds them through here and nowhere else.
"""
from __future__ import annotations

from pathlib import Path

FOLDERS = ("ds_configs", "slurm", "configs")
_PACKAGE = Path(__file__).resolve().parent


def folder(name: str) -> Path:
    """The folder ``name`` (one of FOLDERS): inside an installed wheel, else in the checkout."""
    if name not in FOLDERS:
        raise ValueError(f"unknown resource folder {name!r}; one of {FOLDERS}")
    installed = _PACKAGE / "share" / name
    return installed if installed.is_dir() else _PACKAGE.parent / name


def path(folder_name: str, file_name: str) -> Path:
    """``folder(folder_name) / file_name`` (it may not exist; callers say what to do then)."""
    return folder(folder_name) / file_name


def names(folder_name: str, suffix: str) -> list[str]:
    """Stems of the files in a resource folder with ``suffix`` (e.g. the DeepSpeed preset names)."""
    return sorted(p.stem for p in folder(folder_name).glob(f"*{suffix}"))
