"""Which folder a new run may be written into, checked before anything loads: a wrong ``--out`` costs seconds, and
leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from esr.config import Config, ConfigError, from_dict, to_dict
from esr.errors import EsrError


class RunFolderError(EsrError, RuntimeError):
    """The run folder cannot be used as asked (a file, a folder of other files, another run's folder, a run that
    exists without --resume, or no config to resume)."""


def check_new_run_folder(cfg: Config, run_dir: Path) -> None:
    """``run_dir`` can take a new run of ``cfg``: it does not exist yet and can be made (no file on its path), or it
    is an empty folder. A folder of other files is refused (esr would mix its files with them), and so is a folder
    holding a run: the same config is continued with ``--resume``, another config needs another folder."""
    existing = next(p for p in (run_dir, *run_dir.parents, Path(".")) if p.exists())
    if existing != run_dir:
        if not existing.is_dir():
            raise RunFolderError(f"--out {run_dir} cannot be made: {existing} is a file, not a folder. Choose another "
                                 "--out")
        return
    if not run_dir.is_dir():
        raise RunFolderError(f"--out {run_dir} is a file, not a folder: choose another --out (a run folder holds the "
                             "run's config.yaml, metrics.jsonl and checkpoints/)")
    if (run_dir / "config.yaml").is_file():
        difference = _first_difference(cfg, run_dir / "config.yaml")
        if difference is None:
            raise RunFolderError(f"{run_dir} already holds a run: continue it with `esr train --resume {run_dir}`"
                                 " or choose another --out")
        key, theirs, ours = difference
        raise RunFolderError(f"{run_dir} holds another run ({key}={_show(theirs)} there, {_show(ours)} here): choose "
                             f"another --out, or continue that run as it is with `esr train --resume {run_dir}`")
    entries = sorted(os.listdir(run_dir))
    if entries:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise RunFolderError(f"--out {run_dir} is a folder of other files ({shown}) without a run's config.yaml: "
                             "choose another --out, or empty the folder (esr would mix its files with them)")


def _first_difference(cfg: Config, saved_path: Path) -> tuple[str, Any, Any] | None:
    """The first dotted key whose value differs between ``cfg`` and the config saved at ``saved_path``, as (key,
    saved value, new value); None when they are equal. Defaults are filled in on both sides, so a saved file that
    omits a default equals a config that states it."""
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = None
    try:
        theirs = _flatten(to_dict(from_dict(saved)))
    except ConfigError:  # a damaged or foreign config.yaml: compare what it holds
        theirs = _flatten(saved) if isinstance(saved, dict) else {}
    ours = _flatten(to_dict(cfg))
    for key in [*ours, *(k for k in theirs if k not in ours)]:
        if theirs.get(key, "<unset>") != ours.get(key, "<unset>"):
            return key, theirs.get(key, "<unset>"), ours.get(key, "<unset>")
    return None


def _show(value: Any) -> str:
    return "null" if value is None else str(value)


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
