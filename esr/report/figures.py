"""The report's figures as PNG bytes: training curves, evaluations over steps, seconds per phase and peak memory.

Drawn with ``esr.plots`` (a Figure on its own Agg canvas: no pyplot, no global backend, no display). matplotlib is
optional here: when ``esr.plots.available()`` is False the report keeps its tables and says the plots were left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from esr.plots import figure, png_bytes
from esr.report.collect import PHASES, RunData
from esr.report.fmt import PHASE_COLORS

DPI = 110


def _figure(ncols: int = 1, nrows: int = 1, width: float = 7.5, height: float = 3.6) -> tuple[Any, list[Any]]:
    """A white figure with its axes, flattened into a list."""
    from matplotlib.ticker import MaxNLocator

    fig = figure(width, height, dpi=DPI, facecolor="white", layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, list(axes.flat)


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes."""
    return png_bytes(fig, dpi=DPI)


def _wide_range(values: list[float]) -> bool:
    """Positive values spanning more than two decades (drawn on a log axis)."""
    positive = [v for v in values if math.isfinite(v) and v > 0]
    return len(positive) == len(values) > 1 and max(positive) / min(positive) > 100


def line_plot(runs: Sequence[RunData], key: str, ylabel: str) -> bytes | None:
    """``key`` over steps, one line per run in its colour; None when no run recorded it."""
    curves = [(run, *run.series(key)) for run in runs]
    if not any(values for _, _, values in curves):
        return None
    fig, (ax,) = _figure()
    for run, steps, values in curves:
        if values:
            ax.plot(steps, values, color=run.color, label=run.name, linewidth=1.6,
                    marker="o" if len(values) <= 40 else None, markersize=3.5)
    if _wide_range([v for _, _, values in curves for v in values]):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize=8)
    return _png(fig)


def eval_plot(runs: Sequence[RunData], keys: Sequence[str]) -> bytes | None:
    """One panel per evaluation key over steps, one line per run; the best point of each run's metric starred."""
    runs = [r for r in runs if r.evals]
    if not runs or not keys:
        return None
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = _figure(ncols, nrows, width=3.6 * ncols + 0.6, height=2.9 * nrows)
    for ax, key in zip(axes, keys, strict=False):
        for run in runs:
            steps, values = run.series(key, run.evals)
            if values:
                ax.plot(steps, values, color=run.color, label=run.name, linewidth=1.5, marker="o", markersize=3.5)
            best = run.best or {}
            if key == run.eval_metric and isinstance(best.get("value"), int | float):
                ax.plot([best["step"]], [best["value"]], marker="*", markersize=14, color=run.color,
                        markeredgecolor="black", markeredgewidth=0.6, linestyle="none")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    axes[0].legend(frameon=False, fontsize=7)
    return _png(fig)


def phase_plot(runs: Sequence[RunData]) -> bytes:
    """Left: mean seconds per step, stacked by phase, one bar per run. Right: peak memory per run."""
    fig, (ax_time, ax_mem) = _figure(ncols=2, width=max(7.5, 1.6 * len(runs) + 4))
    x = list(range(len(runs)))
    bottom = [0.0] * len(runs)
    for phase in PHASES:
        heights = [run.mean(f"seconds_{phase}") or 0.0 for run in runs]
        if any(heights):
            ax_time.bar(x, heights, bottom=bottom, color=PHASE_COLORS[phase], label=phase, width=0.6)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax_time.set_ylabel("seconds per step (mean)")
    ax_time.legend(frameon=False, fontsize=8, ncols=len(PHASES), loc="lower center", bbox_to_anchor=(0.5, 1.0))
    peaks = [max(run.series("peak_mem_gb")[1], default=0.0) for run in runs]
    ax_mem.bar(x, peaks, color=[run.color for run in runs], width=0.6)
    for i, peak in enumerate(peaks):
        ax_mem.annotate(f"{peak:.2f}", (i, peak), ha="center", va="bottom", fontsize=8)
    ax_mem.set_ylabel("peak memory (GB)")
    for ax in (ax_time, ax_mem):
        ax.set_xticks(x, [run.name for run in runs], rotation=20 if len(runs) > 3 else 0, fontsize=8)
        for label, run in zip(ax.get_xticklabels(), runs, strict=True):
            label.set_color(run.color)
    return _png(fig)


def auto_profile_plot(runs: Sequence[RunData]) -> bytes:
    """Each auto run's last running profile as the cumulative share of its KL mass over positions, N marked."""
    fig, (ax,) = _figure()
    for run in runs:
        last = run.auto_profile[-1]
        mass = np.asarray(last.get("profile") or [0.0], dtype=np.float64)
        total = mass.sum()
        cumulative = np.cumsum(mass) / total if total > 0 else np.zeros_like(mass)
        ax.plot(range(1, len(mass) + 1), cumulative, color=run.color, linewidth=1.6,
                label=f"{run.name} (before step {last['step']}, N = {last.get('n')})")
        if isinstance(last.get("n"), int):
            ax.axvline(last["n"], color=run.color, linestyle=":", linewidth=1.2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("response position t")
    ax.set_ylabel("cumulative share of the KL mass")
    ax.legend(frameon=False, fontsize=8)
    return _png(fig)
