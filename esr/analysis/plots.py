"""Small matplotlib helpers shared by the analysis probes: one style, headless rendering, atomic PNG writes.

The ``Agg`` backend is selected before pyplot is imported, so the probes run on machines without a display. Figures
are written at 120 dpi to a temporary name and renamed, so a crash never leaves a half-written PNG.

    fig, ax = new_figure()
    line_with_band(ax, x, mean, low, high, label="KL", color=COLORS["kl"])
    save_png(fig, out_dir / "plot.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

if TYPE_CHECKING:
    from esr.analysis.decay import DecayResult
    from esr.analysis.kl_profile import KLProfile

DPI = 120
COLORS = {"kl": "#c0392b", "student": "#2e86c1", "teacher": "#27ae60", "cumulative": "#7f8c8d", "mark": "#8e44ad"}
"""One colour per quantity, the same in every figure."""
STYLE = {"axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "font.size": 9, "legend.fontsize": 8,
         "legend.framealpha": 0.85}


def new_figure(ncols: int = 1, *, width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    """A figure with ``ncols`` side-by-side axes in the shared style; returns (figure, axes or array of axes)."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=True)
    for ax in ([axes] if ncols == 1 else list(axes)):
        _style(ax)
    return fig, axes


def _style(ax: Any) -> None:
    ax.grid(True, alpha=STYLE["grid.alpha"])
    ax.spines["top"].set_visible(False)


def line_with_band(
    ax: Any,
    x: Sequence[float],
    y: Sequence[float],
    low: Sequence[float] | None = None,
    high: Sequence[float] | None = None,
    *,
    label: str,
    color: str,
    marker: str | None = None,
) -> None:
    """Plot ``y`` against ``x`` with a shaded band between ``low`` and ``high`` (e.g. the 25th-75th percentiles)."""
    ax.plot(x, y, color=color, label=label, marker=marker, linewidth=1.6, markersize=4)
    if low is not None and high is not None:
        ax.fill_between(x, low, high, color=color, alpha=0.18, linewidth=0)


def save_png(fig: Any, path: str | Path) -> Path:
    """Write ``fig`` as a PNG at ``DPI`` (temporary name, then rename) and close it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=DPI, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_kl_profile(profile: KLProfile, path: str | Path) -> Path:
    """The paper's figure: per-position reverse KL, student entropy and teacher entropy (bucket means; bands: p25-p75
    over rollouts of each rollout's bucket mean) against the position, the cumulative KL share C(t) on a twin axis,
    N marked."""
    fig, ax = new_figure(width=8.0, height=4.5)
    names = {"kl": "reverse KL(p_s || p_t)", "student_entropy": "student entropy H_s",
             "teacher_entropy": "teacher entropy H_t"}
    colors = {"kl": COLORS["kl"], "student_entropy": COLORS["student"], "teacher_entropy": COLORS["teacher"]}
    for q, label in names.items():
        bs = profile.buckets[q]
        x = [(b.start + b.stop) / 2 for b in bs]
        line_with_band(ax, x, [b.mean for b in bs], [b.rollout_p25 for b in bs], [b.rollout_p75 for b in bs],
                       label=label, color=colors[q])
    ax.set_xlabel(f"response position t (tokens; means over buckets of {profile.bucket}, bands: p25-p75 over "
                  f"rollouts)")
    ax.set_ylabel("nats")
    twin = ax.twinx()
    t = range(1, len(profile.cumulative_T) + 1)
    twin.plot(t, profile.cumulative_T, color=COLORS["cumulative"], linestyle="--", label="cumulative KL share C(t)")
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("cumulative KL share C(t)")
    if profile.recommended_n is not None:
        ax.axvline(profile.recommended_n, color=COLORS["mark"], linestyle=":", linewidth=1.5,
                   label=f"N = {profile.recommended_n} (C(N) >= {profile.share:.0%})")
        twin.axhline(profile.share, color=COLORS["mark"], linestyle=":", linewidth=0.8, alpha=0.6)
    alive = int(profile.mask_B_R.shape[0])
    ax.set_title(f"KL profile: {profile.settings.get('student', 'student')} <- "
                 f"{profile.settings.get('teacher', 'teacher')} ({alive} rollouts)")
    lines, labels = ax.get_legend_handles_labels()
    lines2, labels2 = twin.get_legend_handles_labels()
    ax.legend(lines + lines2, labels + labels2, loc="upper right")
    return save_png(fig, path)


def plot_decay(result: DecayResult, path: str | Path) -> Path:
    """Two panels: the continuer's accuracy (avg@n) against the prefix length k, and Delta(k) = acc(0) - acc(k)."""
    fig, (left, right) = new_figure(2, width=10.0, height=4.0)
    ks = list(result.ks)
    who = f"{result.continuer} continues {result.prefix_source}'s k-token prefix"
    line_with_band(left, ks, [result.accuracy[k] for k in ks], label=who, color=COLORS["teacher"], marker="o")
    left.plot(ks, [result.per_k[k]["cut_share"] for k in ks], color=COLORS["cumulative"], linestyle="--",
              marker=".", label="share cut by max_new_tokens (keep near 0)")
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("prefix length k (tokens)")
    left.set_ylabel(f"accuracy (avg@{result.n})")
    left.set_title(f"decay probe{' (mirror)' if result.mirror else ''}: {result.task}, {result.problems} problems")
    left.legend(loc="best")
    line_with_band(right, ks, [result.gap[k] for k in ks], label="Delta(k) = acc(0) - acc(k)", color=COLORS["kl"],
                   marker="o")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xlabel("prefix length k (tokens)")
    right.set_ylabel("recoverability gap Delta(k)")
    right.set_title("> 0: the prefix costs the continuer accuracy")
    right.legend(loc="best")
    return save_png(fig, path)
