"""The one place esr draws with matplotlib: a figure in the house style, a line with a band, PNG files and bytes.

Figures are ``matplotlib.figure.Figure`` objects on their own Agg canvas: no pyplot, no global backend switched on
import, no display needed, nothing left open in a global figure registry. matplotlib is imported inside the
functions, so importing this module costs nothing; ``available()`` says whether it is installed (the report then
keeps its tables and leaves the plots out). PNG files are written to a temporary name and renamed, so a crash never
leaves half an image.

    fig, ax = new_figure()
    line_with_band(ax, x, mean, low, high, label="KL", color=COLORS["kl"])
    save_png(fig, out_dir / "plot.png")
"""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DPI = 120
COLORS = {"kl": "#c0392b", "student": "#2e86c1", "teacher": "#27ae60", "cumulative": "#7f8c8d", "mark": "#8e44ad"}
"""One colour per quantity, the same in every analysis figure."""
STYLE = {"axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "font.size": 9, "legend.fontsize": 8,
         "legend.framealpha": 0.85}
"""rc settings the figures are created under."""


def available() -> bool:
    """Whether matplotlib is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def figure(width: float, height: float, *, dpi: int = DPI, **kwargs: Any) -> Any:
    """An empty ``Figure`` of ``width`` x ``height`` inches attached to an Agg canvas (``kwargs`` go to Figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def new_figure(ncols: int = 1, *, width: float = 7.0, height: float = 4.0) -> tuple[Any, Any]:
    """A figure with ``ncols`` side-by-side axes in the house style; returns (figure, axes or array of axes)."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        fig = figure(width, height)
        axes = fig.subplots(1, ncols, squeeze=True)
    for ax in [axes] if ncols == 1 else list(axes):
        ax.grid(True, alpha=STYLE["grid.alpha"])
        ax.spines["top"].set_visible(False)
    return fig, axes


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
    """Write ``fig`` as a PNG at ``DPI`` (tight layout; temporary name, then rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=DPI, format="png")
    tmp.replace(path)
    return path


def png_bytes(fig: Any, *, dpi: int = DPI, facecolor: str = "white") -> bytes:
    """The figure as PNG bytes (to embed in a page)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor=facecolor)
    return buf.getvalue()
