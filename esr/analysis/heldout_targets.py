"""What ``esr probe heldout-kl`` measures: its TARGET arguments resolved to models, each with the run it belongs to.

    RUN               the run's newest checkpoint
    RUN@step-8        that checkpoint (``RUN@8`` too)
    RUN@base          the run's untrained student (config ``student.name``)

``steps`` turns every plain RUN into ``RUN@step-S`` for each S; ``base`` puts the first run's untrained student
first, so every other target is compared with it. All targets must share the teacher (they are measured against
it) and the data (they are measured on the same prompts); a run folder without config.yaml, a run without
checkpoints and a step it does not have are refused with one line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from esr.analysis.rollout_scores import AnalysisError, load_run_config, resolve_checkpoint
from esr.config import Config

BASE = "base"


@dataclass(frozen=True)
class Target:
    """One model to measure: a checkpoint of a run, or (``checkpoint`` None) the run's untrained student."""

    label: str
    """``<run folder name>@<step-NNNNNN | base>`` (made unique when two runs share a folder name)."""
    run_dir: Path
    checkpoint: Path | None
    cfg: Config
    """The run's config (its teacher, data, sampling settings)."""

    @property
    def spec(self) -> str:
        """What ``load_model`` loads: the checkpoint folder, or the student's name for the base."""
        return str(self.checkpoint) if self.checkpoint is not None else self.cfg.student.name


def resolve_targets(specs: Sequence[str], *, steps: Sequence[int] = (), base: bool = False) -> list[Target]:
    """The targets of ``specs`` in order (module docstring), checked before any model loads."""
    targets: list[Target] = []
    configs: dict[Path, Config] = {}
    for spec in specs:
        run, _, which = str(spec).partition("@")
        run_dir = Path(run).expanduser()
        if run_dir not in configs:
            configs[run_dir] = load_run_config(run_dir)
        whiches = [which] if which or not steps else [f"step-{s:06d}" for s in steps]
        for w in whiches:
            targets.append(_target(run_dir, w, configs[run_dir]))
    if base and targets and targets[0].checkpoint is not None:
        first = targets[0]
        targets.insert(0, _target(first.run_dir, BASE, first.cfg))
    _check_same(targets)
    return _unique_labels(_drop_repeats(targets))


def _target(run_dir: Path, which: str, cfg: Config) -> Target:
    if which == BASE:
        return Target(f"{run_dir.name}@{BASE}", run_dir, None, cfg)
    step = re.fullmatch(r"(?:step-)?(\d+)", which)
    checkpoint = resolve_checkpoint(run_dir, int(step.group(1)) if step else which or "last")
    return Target(f"{run_dir.name}@{checkpoint.name}", run_dir, checkpoint, cfg)


def _check_same(targets: list[Target]) -> None:
    """One teacher and one data set for all: the KL is measured against one teacher on one prompt set."""
    first = targets[0]
    for t in targets[1:]:
        if t.cfg.teacher.name != first.cfg.teacher.name:
            raise AnalysisError(f"{t.label} was trained with teacher '{t.cfg.teacher.name}' but {first.label} with "
                                f"'{first.cfg.teacher.name}': held-out KL compares targets against one teacher; "
                                "measure each teacher's runs separately")
        if t.cfg.data != first.cfg.data:
            raise AnalysisError(f"{t.label} was trained on other data than {first.label} (their data sections "
                                "differ): the targets are compared on the same held-out prompts; measure runs of "
                                "one data set together")


def _drop_repeats(targets: list[Target]) -> list[Target]:
    seen: set[tuple[Path, Path | None]] = set()
    out = []
    for t in targets:
        key = (t.run_dir.resolve(), None if t.checkpoint is None else t.checkpoint.resolve())
        if key not in seen:
            seen.add(key)
            out.append(t)
    return out


def _unique_labels(targets: list[Target]) -> list[Target]:
    """Two runs in different parents with one folder name get ``#2``, ``#3`` ... after the repeated label."""
    count: dict[str, int] = {}
    out = []
    for t in targets:
        count[t.label] = count.get(t.label, 0) + 1
        label = t.label if count[t.label] == 1 else f"{t.label}#{count[t.label]}"
        out.append(Target(label, t.run_dir, t.checkpoint, t.cfg))
    return out
