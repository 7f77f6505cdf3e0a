"""Extending a run: ``esr train --resume RUN train.steps=N`` continues a finished or stopped run to step N.

Only the keys in ``EXTENDABLE`` may change on resume: they decide how far the run goes and when it writes
checkpoints and evaluates, never what a step computes. Every other key (learning rate, data, seeds, models, loss,
horizon, ...) would make the run neither the one its checkpoints were computed with nor the one asked for, so it is
refused, naming the key. The updated config replaces ``RUN/config.yaml`` (atomically, so a later plain ``--resume``
continues to N), and each extension is recorded in ``run.json`` under ``extensions``.

What an extended run equals: the same run started with the new values. Nothing a step computes depends on
``train.steps``: the data order (``esr.data.order.batch_indices``), the horizon policies and the sampling seeds are
functions of the step, and the learning rate is a linear warm-up over ``train.warmup_steps`` then constant
(``esr.train.session.make_optimizer``), so a 4-step run extended to 8 ends bit for bit where an 8-step run ends
(``tests/reliability/test_extend_run.py``). The differences are in the files: a finished run wrote a checkpoint at
its old last step (a run started with N writes one there only if the cadence says so). EffOPD's KL probe keeps the
prompts and rollouts it was built with when the run started (``extrapolate/probe.safetensors``); with a file or hub
data source those are prompts the ORIGINAL steps never drew (``esr.data.heldout``), so training beyond them may draw
probe prompts, where a run started with N would have chosen others: ``started_config`` gives the probe the config
the run started with.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from esr.config import Config, ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict
from esr.models.checkpoints import CHECKPOINTS
from esr.train.distributed import is_main

EXTENDABLE = {
    "train.steps": "how far the run goes (at least the newest checkpoint's step)",
    "train.checkpoint_every": "when checkpoints are written",
    "eval.every": "when the held-out evaluation runs (0: never)",
}
"""The keys ``esr train --resume RUN key=value`` may change, and what each decides."""

EXTENSIONS = "extensions"
"""The ``run.json`` key holding the list of extensions: {time, at_step, changed: {key: [old, new]}}."""

_STEP_DIR = re.compile(r"^step-(\d{6,})(\.old-\d+)?$")  # a set-aside .old-* folder is a checkpoint resume restores


class RunExtensionError(ConfigError):
    """An override given with ``--resume`` that a run cannot take: a key outside ``EXTENDABLE``, or ``train.steps``
    below the steps already checkpointed."""


def extend_run(run_dir: Path, overrides: list[str]) -> Config:
    """The run's config with ``overrides`` (``EXTENDABLE`` keys only) applied; when they change it, write it to
    ``RUN/config.yaml`` and record the extension in ``run.json`` (the main process only). No overrides: the run's
    config as it is."""
    path = run_dir / "config.yaml"
    old = load_config(path)
    if not overrides:
        return old
    new = load_config(path, overrides)  # unknown keys and bad values: the usual ConfigError, naming the key
    keys = list(dict.fromkeys(item.split("=", 1)[0].strip() for item in overrides))
    for key in keys:
        if key not in EXTENDABLE:
            item = next(i for i in overrides if i.split("=", 1)[0].strip() == key)
            raise RunExtensionError(
                f"{key} cannot change when a run is resumed: {run_dir}'s checkpoints were computed with "
                f"{key}={_get(old, key)!r}. --resume takes only {', '.join(EXTENDABLE)}; for another {key} start a "
                f"new run: esr train {path} {item} --out NEW_FOLDER")
    floor = checkpointed_steps(run_dir)
    if new.train.steps < floor:
        raise RunExtensionError(
            f"train.steps={new.train.steps} is below the {floor} steps {run_dir} has already checkpointed; a run "
            f"cannot go back behind its checkpoints: give train.steps={floor} or more (the step folders under "
            f"{run_dir / CHECKPOINTS} hold the earlier states)")
    changed = {k: [_get(old, k), _get(new, k)] for k in keys if _get(old, k) != _get(new, k)}
    if changed and is_main():
        save_config(new, path)  # atomic
        _record(run_dir, {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "at_step": floor,
                          "changed": changed})
    return new


def checkpointed_steps(run_dir: Path) -> int:
    """The step of the run's newest checkpoint folder (0 without one): what a resume starts from at most."""
    root = run_dir / CHECKPOINTS
    found = [int(m.group(1)) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))] if root.is_dir() else []
    return max(found, default=0)


def started_config(cfg: Config, run_dir: Path) -> Config:
    """``cfg`` with the ``EXTENDABLE`` values the run started with (before any recorded extension)."""
    first: dict[str, Any] = {}
    for record in extensions(run_dir):
        for key, (old, _) in record.get("changed", {}).items():
            first.setdefault(key, old)
    if not first:
        return cfg
    return from_dict(apply_overrides(to_dict(cfg), [f"{k}={json.dumps(v)}" for k, v in first.items()]))


def extensions(run_dir: Path) -> list[dict[str, Any]]:
    """The extensions recorded in ``run.json`` (oldest first; empty for a run never extended)."""
    path = run_dir / "run.json"
    try:
        return list(json.loads(path.read_text()).get(EXTENSIONS, []))
    except (OSError, ValueError, AttributeError):
        return []


def _record(run_dir: Path, record: dict[str, Any]) -> None:
    path = run_dir / "run.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = {}
    info[EXTENSIONS] = [*info.get(EXTENSIONS, []), record]
    tmp = run_dir / f".run.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, path)


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
