"""Evaluation during training: every ``eval.every`` steps, the best checkpoint by ``eval.metric``, collapse warnings.

Each evaluation writes ``eval/step-NNNNNN/{samples.jsonl,summary.json}`` and appends one line to
``eval/history.jsonl``; ``eval/best.json`` names the step (and its checkpoint) with the highest metric so far.
An evaluation step always has a checkpoint, so the best one can be loaded. A collapse warning is logged (and
recorded in the history line) when the collapse guard's eval signals trip against the first evaluation
(``PeriodicEval._collapse``; thresholds in ``train.guard``), whatever ``train.guard.policy``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from esr.config import Config, ConfigError
from esr.eval.runner import evaluate
from esr.eval.tasks import make_task
from esr.train.guard import eval_trips

log = logging.getLogger("esr.train")

class PeriodicEval:
    """Runs the held-out evaluation at its steps and keeps ``eval/history.jsonl`` and ``eval/best.json``."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg, self.folder, self.guard = cfg.eval, run_dir / "eval", cfg.train.guard
        self.task = make_task(cfg.eval.task, path=cfg.eval.path) if cfg.eval.every else None
        self.history_path = self.folder / "history.jsonl"

    def due(self, step: int) -> bool:
        """Whether 1-based ``step`` ends with an evaluation."""
        return self.task is not None and step % self.cfg.every == 0

    def truncate_after(self, step: int) -> None:
        """On resume: forget evaluations of steps that are being redone."""
        rows = [r for r in self.history() if r["step"] <= step]
        if self.history_path.is_file():
            tmp = self.history_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            tmp.replace(self.history_path)
            self._write_best(rows)

    def history(self) -> list[dict[str, Any]]:
        if not self.history_path.is_file():
            return []
        rows = []
        for line in self.history_path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line from a crash: drop it
                continue
        return rows

    def run(self, step: int, model: Any, tokenizer: Any, checkpoint: Path | None) -> dict[str, Any]:
        """Evaluate now (after 1-based ``step``); returns the history row written."""
        assert self.task is not None
        c = self.cfg
        result = evaluate(model, tokenizer, self.task, n=c.n, temperature=c.temperature, limit=c.limit,
                          max_new_tokens=c.max_new_tokens, batch_size=c.batch_size, seed=step,
                          out_dir=self.folder / f"step-{step:06d}", progress=False)
        if c.metric not in result.summary:
            raise ConfigError(f"eval.metric={c.metric!r} is not in the summary of task {self.task.name}; "
                              f"choose one of {sorted(k for k, v in result.summary.items() if isinstance(v, float))}")
        previous = self.history()
        row = {"step": step, "checkpoint": str(checkpoint) if checkpoint else None,
               **{k: v for k, v in result.summary.items() if isinstance(v, int | float)}}
        row["collapse_warning"] = self._collapse(row, previous)
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.history_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_best([*previous, row])
        return row

    def _write_best(self, rows: list[dict[str, Any]]) -> None:
        """``best.json`` for the history ``rows`` (removed when there are none), written atomically."""
        path, metric = self.folder / "best.json", self.cfg.metric
        rows = [r for r in rows if metric in r]
        if not rows:
            path.unlink(missing_ok=True)
            return
        best = max(rows, key=lambda r: r[metric])
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"metric": metric, "value": best[metric], "step": best["step"],
                                   "checkpoint": best["checkpoint"]}, indent=2))
        tmp.replace(path)

    def _collapse(self, row: dict[str, Any], previous: list[dict[str, Any]]) -> str | None:
        """A warning when this evaluation's signals trip against the first evaluation (``esr.train.guard.eval_trips``
        with ``eval.collapse_drop``): the metric fell by more than collapse_drop x its first value and 3 standard
        errors, or the cut, repeated 4-gram or several-boxes share rose. Against the first value, not the best: a
        metric that starts at 0 cannot fall, and the label-free shares still see a collapse."""
        if not previous:
            return None
        history = [previous[0], row]
        trips = eval_trips(history, self.cfg.metric, self.cfg.limit * self.cfg.n, self.guard, self.cfg.collapse_drop)
        if not trips:
            return None
        message = f"possible collapse at step {row['step']}: " + "; ".join(t.describe() for t in trips)
        log.warning(message)
        return message
