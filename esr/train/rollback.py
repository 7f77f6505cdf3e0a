"""What the collapse guard does when a signal trips (the signals: esr/train/guard.py; the knobs: ``train.guard``).

Every trip is a line of ``RUN/guard/events.jsonl`` (step, signal, value, baseline, threshold, action) and a note on
the progress line. Policy ``warn``: that and a warning. Policy ``rollback``:

1. the checkpoint to go back to is the newest one before the trip's step: the run's own (checkpoints/step-N), or
   the guard's copy of the starting weights (guard/checkpoints/step-N, written before the first step);
2. the metrics (and samples) lines after it move to ``guard/rolled-back-metrics.jsonl``; metrics.jsonl, the
   evaluations and EffOPD's events are cut back to it, as a resume does; the run's checkpoints after it are removed
   (they hold the collapsing weights, and a resume must not pick them);
3. weights, optimizer, scheduler, RNG (and EffOPD's state) are loaded from it exactly as a resume does; the learning
   rate is multiplied by ``lr_factor`` (cumulative);
4. that step is saved again as the run's checkpoint with the new trip count and rate (trainer_state.json's
   ``guard``; the scheduler's base rate), so ``esr train --resume`` after a rollback goes on exactly as the run did;
5. the loop starts again after it (``GuardRollback``, caught in esr/train/loop.py).

At the ``max_trips``-th trip the run stops instead with ``GuardStopError`` (its checkpoints kept). With several
processes (torchrun, FSDP) ``rollback`` acts as ``warn``: only rank 0 keeps the logs the detector reads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from esr.config import Config
from esr.errors import EsrError
from esr.models.checkpoints import TRAINER_STATE_JSON, list_checkpoints, trainer_files
from esr.train.checkpoint import load_checkpoint
from esr.train.distributed import main_only, world_size
from esr.train.guard import Trip, eval_trips, step_trips
from esr.train.horizon_probe import restore_horizon
from esr.train.metrics import append_jsonl, truncate_jsonl

log = logging.getLogger("esr.train")

GUARD = "guard"
"""The guard's folder in a run: events.jsonl, rolled-back-metrics.jsonl, checkpoints/ (the starting weights)."""


class GuardStopError(EsrError, RuntimeError):
    """The collapse guard tripped ``train.guard.max_trips`` times; the run stops with its checkpoints kept."""


class GuardRollback(Exception):  # noqa: N818 - control flow, not an error: the loop goes on from ``step``
    """The guard rolled the run back to the checkpoint of ``step``; the loop starts again after it."""

    def __init__(self, step: int, checkpoint: Path, nonfinite_in_a_row: int) -> None:
        super().__init__(f"rolled back to step {step}")
        self.step, self.checkpoint, self.nonfinite_in_a_row = step, checkpoint, nonfinite_in_a_row


class Guard:
    """The guard of one run: checks each step's and each evaluation's signals and acts on a trip (module
    docstring). ``save(step, folder, nonfinite_in_a_row)``: writes the checkpoint of ``step`` under ``folder``
    (the loop's own writer)."""

    def __init__(self, cfg: Config, run_dir: Path, session: Any, extrapolator: Any, metrics_log: Any, evals: Any,
                 save: Callable[[int, Path, int], Path], checkpoint: Path | None) -> None:
        self.cfg, self.g, self.run_dir = cfg, cfg.train.guard, run_dir
        self.s, self.extrapolator, self.log, self.evals, self.save = session, extrapolator, metrics_log, evals, save
        self.folder = run_dir / GUARD
        if self.g.policy == "rollback" and world_size() > 1:  # only rank 0 keeps the logs the detector reads
            self.g = dataclasses.replace(self.g, policy="warn")
            log.info("train.guard.policy=rollback runs in one process only; with %d processes it warns", world_size())
        self.trips, self.lr_scale = 0, 1.0
        if checkpoint is not None:  # a resume: the trips and the rate scale as that checkpoint had them
            state = json.loads((trainer_files(checkpoint) / TRAINER_STATE_JSON).read_text()).get(GUARD) or {}
            self.trips, self.lr_scale = int(state.get("trips", 0)), float(state.get("lr_scale", 1.0))

    @property
    def on(self) -> bool:
        return self.g.policy != "off"

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the guard (trainer_state.json's ``guard``)."""
        return {"trips": self.trips, "lr_scale": self.lr_scale}

    def start(self, step: int) -> None:
        """Before the first step of a session (``rollback``): keep the starting weights in guard/checkpoints when no
        checkpoint of the run holds them, so a trip always has a checkpoint to go back to. ``eval_at_start``:
        evaluate them first (step 0), once per run."""
        at_start = self.on and self.g.eval_at_start and self.evals.task is not None and step == 0
        kept = [p for p in self._candidates() if self._step_of(p) == step]
        if (self.g.policy == "rollback" or at_start) and not kept:
            kept = [self.save(step, self.folder, 0)]
        if at_start and not any(r["step"] == 0 for r in self.evals.history()):
            main_only(self.evals.run, 0, self.s.student, self.s.tokenizer, kept[0])

    def check_step(self, step: int, bar: Any) -> None:
        """After step ``step`` was logged: its step signals (may roll back: ``GuardRollback``)."""
        if self.on:
            self._act(step_trips(self.log.read(), self.g), bar)

    def check_eval(self, step: int, bar: Any) -> None:
        """After the evaluation of step ``step``: its eval signals."""
        if self.on and self.evals.task is not None:
            answers = self.cfg.eval.limit * self.cfg.eval.n
            self._act(eval_trips(self.evals.history(), self.cfg.eval.metric, answers, self.g), bar)

    def _act(self, trips: list[Trip], bar: Any) -> None:
        if not trips:
            return
        step, what = trips[0].step, "; ".join(t.describe() for t in trips)
        if self.g.policy == "warn":  # each signal warns once (its first trip), not at every step after it
            trips = [t for t in trips if t.signal not in self._warned()]
            if not trips:
                return
            what = "; ".join(t.describe() for t in trips)
            self._record(trips, "warn")
            bar.note(f"guard step {step}: {what} (policy warn: going on)")
            log.warning("collapse guard tripped at step %d: %s", step, what)
            return
        if self.trips + 1 >= self.g.max_trips:
            self._record(trips, "stop")
            bar.close()
            raise GuardStopError(
                f"the collapse guard tripped {self.trips + 1} times (max_trips {self.g.max_trips}), last at step "
                f"{step}: {what}. Events: {self.folder / 'events.jsonl'}; checkpoints kept in "
                f"{self.run_dir / 'checkpoints'}. Lower train.lr (now x{self.lr_scale:g}), or raise "
                "train.guard.max_trips, or set train.guard.policy=warn")
        self._record(trips, "rollback")
        target = max((p for p in self._candidates() if self._step_of(p) < step), key=self._step_of)
        back = self._step_of(target)
        nonfinite = self._restore(target, back)
        bar.note(f"guard step {step}: {what}; rolled back to step {back}, lr x{self.lr_scale:g}")
        raise GuardRollback(back, self.save(back, self.run_dir, nonfinite), nonfinite)

    def _restore(self, target: Path, back: int) -> int:
        """Cut the logs back to step ``back``, drop the later checkpoints, load ``target`` and lower the rate;
        returns the checkpoint's non-finite count."""
        rows = [r for r in self.log.read() if r["step"] > back]
        for row in rows:
            main_only(append_jsonl, self.folder / "rolled-back-metrics.jsonl", {**row, "trip": self.trips + 1})
        forget_after(self.run_dir, back, self.log, self.evals)
        state = load_checkpoint(target, self.s.student, self.s.optimizer, self.s.scheduler, self.extrapolator)
        restore_horizon(self.s.policy, state, target)  # rollout.horizon=auto: N and the profile of that step
        for p in list_checkpoints(self.run_dir):
            if self._step_of(p) > back:
                main_only(shutil.rmtree, p, True)
        self.trips, self.lr_scale = self.trips + 1, self.lr_scale * self.g.lr_factor
        sched = self.s.scheduler
        new_base = [self.cfg.train.lr * self.lr_scale for _ in sched.base_lrs]
        ratios = [n / o for n, o in zip(new_base, sched.base_lrs, strict=True)]
        sched.base_lrs = new_base
        for group, r in zip(self.s.optimizer.param_groups, ratios, strict=True):
            group["lr"] *= r
        sched._last_lr = [group["lr"] for group in self.s.optimizer.param_groups]
        return int(state.get("nonfinite_in_a_row", 0))

    def _record(self, trips: list[Trip], action: str) -> None:
        for t in trips:
            main_only(append_jsonl, self.folder / "events.jsonl", {**t.as_row(action), "trip": self.trips + 1,
                                                                    "lr_scale": self.lr_scale})

    def _warned(self) -> set[str]:
        """The signals that already warned (events.jsonl, which outlives a resume)."""
        path = self.folder / "events.jsonl"
        if not path.is_file():
            return set()
        return {json.loads(line)["signal"] for line in path.read_text().splitlines() if line.strip()}

    def _candidates(self) -> list[Path]:
        return [*list_checkpoints(self.run_dir), *list_checkpoints(self.folder)]

    @staticmethod
    def _step_of(path: Path) -> int:
        return int(path.name.split("-")[1].split(".")[0])


def forget_after(run_dir: Path, step: int, log: Any, evals: Any) -> None:
    """What a run logged after ``step`` goes, as when it resumes from (or rolls back to) that step's checkpoint:
    metrics (and samples), evaluations, EffOPD events and the auto horizon's probes. The one cut-back for both."""
    log.truncate_after(step)
    main_only(evals.truncate_after, step)
    main_only(truncate_jsonl, run_dir / "extrapolate" / "events.jsonl", step)
    main_only(truncate_jsonl, run_dir / "auto" / "profile.jsonl", step)
