"""Read run folders for a report: resolved config, run info, per-step metrics, evaluation history and best."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from esr.errors import EsrError
from esr.report.fmt import run_color

PHASES = ("generate", "score", "train", "align", "extrapolate")
"""Phases of a step, each timed as ``seconds_<phase>`` and (newer runs) counted as ``flops_<phase>``."""


class ReportError(EsrError, ValueError):
    """A run folder or analysis path cannot be reported on; the message names it and says what to pass instead."""


@dataclass
class RunData:
    """Everything the report shows about one run folder."""

    path: Path
    name: str
    config: dict[str, Any]
    info: dict[str, Any]
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    extrapolation: list[dict[str, Any]] = field(default_factory=list)
    """EffOPD events (extrapolate/events.jsonl), one per extrapolation."""
    guard: list[dict[str, Any]] = field(default_factory=list)
    """Collapse guard events (guard/events.jsonl), one per tripped signal."""
    auto_profile: list[dict[str, Any]] = field(default_factory=list)
    """``rollout.horizon=auto`` probes (auto/profile.jsonl): step, n_before, n, probe_kl, profile."""
    notes: list[str] = field(default_factory=list)
    """Problems met while reading (torn lines skipped, unreadable files), shown in the report."""
    color: str = "#1f77b4"

    def cfg(self, dotted: str, default: Any = None) -> Any:
        """A value of the resolved config by dotted key (``rollout.n``), or ``default`` when absent."""
        node: Any = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def eval_metric(self) -> str:
        """The metric that picks the best checkpoint (``eval/best.json``, else ``eval.metric``)."""
        return (self.best or {}).get("metric") or self.cfg("eval.metric") or "accuracy"

    @property
    def steps_done(self) -> int:
        """The last completed step."""
        return max((int(r["step"]) for r in self.metrics), default=0)

    def series(self, key: str, rows: list[dict[str, Any]] | None = None) -> tuple[list[int], list[float]]:
        """(steps, values) of the numeric ``key`` over metrics rows (or ``rows``); rows without it are left out."""
        steps, values = [], []
        for r in self.metrics if rows is None else rows:
            v = r.get(key)
            if isinstance(v, int | float) and not isinstance(v, bool) and "step" in r:
                steps.append(int(r["step"]))
                values.append(float(v))
        return steps, values

    def total(self, key: str) -> float | None:
        """Sum of the finite values of ``key`` over steps; None when no step recorded it."""
        _, values = self.series(key)
        return math.fsum(v for v in values if math.isfinite(v)) if values else None

    def mean(self, key: str) -> float | None:
        """Mean of the finite values of ``key`` over steps; None when no step recorded it."""
        _, values = self.series(key)
        finite = [v for v in values if math.isfinite(v)]
        return math.fsum(finite) / len(finite) if finite else None


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a JSONL file and how many non-blank lines were not one (a line torn by a crash)."""
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def _read_mapping(path: Path, notes: list[str], parse: Any) -> dict[str, Any]:
    """A JSON or YAML mapping file, or {} (with a note) when it is missing or unreadable."""
    if not path.is_file():
        notes.append(f"no {path.name}")
        return {}
    try:
        data = parse(path.read_text(encoding="utf-8"))
    except (ValueError, yaml.YAMLError) as e:
        notes.append(f"{path.name} is unreadable ({type(e).__name__})")
        return {}
    return data if isinstance(data, dict) else {}


def load_run(path: Path) -> RunData:
    """Read one run folder; raises ReportError naming it when it is missing or has no complete step."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"run folder {path} does not exist (or is not a folder): pass a folder written by "
                          "`esr train` (it holds config.yaml and metrics.jsonl)")
    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise ReportError(f"{path} has no metrics.jsonl, so it is not a run folder or its run has not finished a "
                          "step yet: pass the folder given to `esr train --out`, e.g. runs/<name>-<time>/")
    metrics, bad = read_jsonl(metrics_path)
    metrics = [r for r in metrics if isinstance(r.get("step"), int)]
    if not metrics:
        raise ReportError(f"{metrics_path} holds no complete step: wait for the run's first step, or check that "
                          "this is the right folder")
    notes = [f"skipped {bad} unreadable line{'s' * (bad > 1)} in metrics.jsonl (torn by a crash?)"] if bad else []
    config = _read_mapping(path / "config.yaml", notes, yaml.safe_load)
    info = _read_mapping(path / "run.json", notes, json.loads)
    run = RunData(path=path, name=path.resolve().name, config=config, info=info, metrics=metrics, notes=notes)
    _load_eval(run)
    run.extrapolation = _step_rows(run, "extrapolate/events.jsonl")
    run.auto_profile = _step_rows(run, "auto/profile.jsonl")
    run.guard = _step_rows(run, "guard/events.jsonl")
    return run


def _step_rows(run: RunData, name: str) -> list[dict[str, Any]]:
    """The rows with an integer step of the run's JSONL file ``name`` ([] when absent); torn lines noted."""
    path = run.path / name
    if not path.is_file():
        return []
    rows, bad = read_jsonl(path)
    if bad:
        run.notes.append(f"skipped {bad} unreadable line{'s' * (bad > 1)} in {name}")
    return [r for r in rows if isinstance(r.get("step"), int)]


def _load_eval(run: RunData) -> None:
    """Fill ``evals`` from eval/history.jsonl and ``best`` from eval/best.json (or the history when it is absent)."""
    history = run.path / "eval" / "history.jsonl"
    if history.is_file():
        rows, bad = read_jsonl(history)
        run.evals = sorted((r for r in rows if isinstance(r.get("step"), int)), key=lambda r: r["step"])
        if bad:
            run.notes.append(f"skipped {bad} unreadable line{'s' * (bad > 1)} in eval/history.jsonl")
    best_path = run.path / "eval" / "best.json"
    if best_path.is_file():
        best = _read_mapping(best_path, run.notes, json.loads)
        run.best = best if "step" in best else None
    if run.best is None and run.evals:
        metric = run.eval_metric
        scored = [r for r in run.evals if isinstance(r.get(metric), int | float)]
        if scored:
            top = max(scored, key=lambda r: r[metric])
            run.best = {"metric": metric, "value": top[metric], "step": top["step"],
                        "checkpoint": top.get("checkpoint")}


def load_runs(paths: Sequence[Path]) -> list[RunData]:
    """Read every run folder, give each a unique display name (its folder's) and its colour."""
    if not paths:
        raise ReportError("no run folders given: pass at least one folder written by `esr train`")
    runs = [load_run(Path(p)) for p in paths]
    folder_names = [r.name for r in runs]
    seen: dict[str, int] = {}
    for i, run in enumerate(runs):
        if folder_names.count(run.name) > 1:  # same folder name under different parents
            run.name = f"{run.path.resolve().parent.name}/{run.name}"
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"
        run.color = run_color(i)
    return runs
