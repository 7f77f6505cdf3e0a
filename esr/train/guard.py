"""The collapse guard's detector: label-free signals of the training loop, each against its own early baseline.

Pure functions of the logged history, so a resumed or rolled-back run sees exactly what an uninterrupted one saw
(the history is cut back to the checkpoint's step) and the committed real histories can be replayed
(tests/test_guard_detector.py). What a trip does is esr/train/rollback.py's.

Step signals, over metrics.jsonl rows (skipped steps left out); baseline: the first ``baseline_steps`` rows; recent:
the last ``window`` rows after them:

    shares   cut_share, repeated_4gram_share, multi_box_share:   mean(recent) - mean(baseline) > share_rise
    length   response_len_mean / horizon:                       mean(recent) > (1 + length_rise) mean(baseline)
    spikes   loss, grad_norm of the last step x, baseline median m, MAD d:
             x > m + spike_z * max(1.4826 d, 0.05 |m|, min_abs)   and   x > spike_ratio * max(m, min_abs),
             and the same against the ``window`` steps before it (a slow drift is not a spike)
    probe    probe_kl (rows that have one): x > (1 + probe_kl_rise) * the first probe's value

Eval signals, over eval/history.jsonl rows; baseline: the mean of the first ``baseline_evals`` rows, b:

    metric   b - x > eval_drop * b   and   b - x > 3 sqrt(b (1 - b) / n)   (n answers: a metric at 0 never trips)
    shares   cut_share + eval_cut_rise, repeated_4gram_share + eval_repeat_rise, multi_box_share + eval_box_rise
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from esr.config.guard import GuardConfig

STEP_SHARES = ("cut_share", "repeated_4gram_share", "multi_box_share")
SPIKES = ("loss", "grad_norm")


@dataclass(frozen=True)
class Trip:
    """One signal past its threshold after ``step``: its value, its baseline and the threshold it crossed."""

    step: int
    signal: str
    value: float
    baseline: float
    threshold: float

    def describe(self) -> str:
        return f"{self.signal} {self.value:.4g} (baseline {self.baseline:.4g}, threshold {self.threshold:.4g})"

    def as_row(self, action: str) -> dict[str, Any]:
        return {"step": self.step, "signal": self.signal, "value": self.value, "baseline": self.baseline,
                "threshold": self.threshold, "action": action}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def step_trips(rows: list[dict[str, Any]], g: GuardConfig) -> list[Trip]:
    """The step signals past their thresholds at the last of ``rows`` (metrics.jsonl rows, oldest first)."""
    ok = [r for r in rows if not r.get("skipped")]
    after = ok[g.baseline_steps:]
    if not after or rows[-1].get("skipped"):
        return []
    base, recent, step = ok[: g.baseline_steps], after[-g.window:], int(rows[-1]["step"])
    trips = []
    for key in STEP_SHARES:
        b, r = _values(base, key), _values(recent, key)
        if b and r and _mean(r) - _mean(b) > g.share_rise:
            trips.append(Trip(step, key, _mean(r), _mean(b), _mean(b) + g.share_rise))
    b, r = _relative_lengths(base), _relative_lengths(recent)
    if b and r and _mean(r) > (1 + g.length_rise) * _mean(b):
        trips.append(Trip(step, "response_length", _mean(r), _mean(b), (1 + g.length_rise) * _mean(b)))
    previous = ok[:-1][-g.window:]  # a spike is sudden: past both the baseline and the steps just before it
    for key in SPIKES:
        spikes = [_spike(step, key, _values(b, key), rows[-1].get(key), g) for b in (base, previous)]
        if all(spikes):
            trips.append(max(spikes, key=lambda t: t.threshold))
    probes = _values(ok, "probe_kl")
    last_probe = rows[-1].get("probe_kl")
    if len(probes) >= 2 and last_probe is not None and last_probe > (1 + g.probe_kl_rise) * probes[0]:
        trips.append(Trip(step, "probe_kl", float(last_probe), probes[0], (1 + g.probe_kl_rise) * probes[0]))
    return trips


def _values(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]


def _relative_lengths(rows: list[dict[str, Any]]) -> list[float]:
    """Response length over the step's horizon: a horizon that moves (rollout.horizon=auto) is not a collapse."""
    return [r["response_len_mean"] / r["horizon"] for r in rows if r.get("horizon") and "response_len_mean" in r]


def _spike(step: int, key: str, base: list[float], value: Any, g: GuardConfig) -> Trip | None:
    """A robust spike test of ``value`` against the baseline values (median and MAD; module docstring)."""
    if not base or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    median = statistics.median(base)
    mad = statistics.median(abs(x - median) for x in base)
    sigma = max(1.4826 * mad, 0.05 * abs(median), g.min_abs)
    threshold = max(median + g.spike_z * sigma, g.spike_ratio * max(median, g.min_abs))
    return Trip(step, key, float(value), median, threshold) if value > threshold else None


def eval_trips(history: list[dict[str, Any]], metric: str, answers: int, g: GuardConfig,
               drop: float | None = None) -> list[Trip]:
    """The eval signals past their thresholds at the last of ``history`` (eval/history.jsonl rows, oldest first);
    ``answers``: answers per evaluation (eval.limit x eval.n) for the metric's noise; ``drop``: the metric's
    relative drop (default ``g.eval_drop``)."""
    if len(history) <= g.baseline_evals:
        return []
    base, row = history[: g.baseline_evals], history[-1]
    step, trips = int(row["step"]), []
    b, x = _values(base, metric), row.get(metric)
    if b and isinstance(x, int | float):
        b0 = _mean(b)
        margin = max((g.eval_drop if drop is None else drop) * b0, 3 * math.sqrt(b0 * (1 - b0) / max(1, answers)))
        if b0 > 0 and b0 - x > margin:
            trips.append(Trip(step, f"eval_{metric}", float(x), b0, b0 - margin))
    for key, rise in (("cut_share", g.eval_cut_rise), ("repeated_4gram_share", g.eval_repeat_rise),
                      ("multi_box_share", g.eval_box_rise)):
        b, x = _values(base, key), row.get(key)
        if b and isinstance(x, int | float) and x - _mean(b) > rise:
            trips.append(Trip(step, f"eval_{key}", float(x), _mean(b), _mean(b) + rise))
    return trips
