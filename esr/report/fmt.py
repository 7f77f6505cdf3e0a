"""Number formatting and colours shared by the HTML and markdown renderings and the plots."""

from __future__ import annotations

import json
import math
from typing import Any

RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
              "#17becf")
"""One colour per run (matplotlib's tab10), the same in every plot and table of a report."""

PHASE_COLORS = {"generate": "#4e79a7", "score": "#f28e2b", "train": "#59a14f", "align": "#b07aa1",
                "extrapolate": "#e15759"}
"""One colour per phase of a step, for the stacked time bars."""

DASH = "—"


def run_color(index: int) -> str:
    """Colour of the ``index``-th run (cycles after ten runs)."""
    return RUN_COLORS[index % len(RUN_COLORS)]


def sci(x: float, digits: int = 2) -> str:
    """Scientific notation without the ``+`` and leading zeros: ``1.2e15``, ``3.4e-5``."""
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def num(x: Any) -> str:
    """A number for a table cell: ``12,345``, ``0.03193``, ``12.35``, ``1.2e15``; ``—`` for None."""
    if x is None:
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) < 1e9 else sci(x)
    if not isinstance(x, float):
        return str(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e6 or abs(x) < 1e-3:
        return sci(x, 3)
    if x.is_integer():
        return f"{int(x):,}"
    if abs(x) >= 100:
        return f"{x:,.1f}"
    return f"{x:.4g}"


def seconds(s: float | None) -> str:
    """A duration: ``0.35 s``, ``12.3 s``, ``4.2 min``, ``1.25 h``."""
    if s is None or not math.isfinite(s):
        return DASH
    if s < 1:
        return f"{s:.2f} s"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def flops(x: float | None) -> str:
    """A FLOP count: ``1.2e15``."""
    return DASH if x is None else sci(x, 2) if x else "0"


def gigabytes(x: float | None) -> str:
    """A memory size in GB: ``0.61 GB``."""
    return DASH if x is None else f"{x:.2f} GB"


def share(x: float | None) -> str:
    """A share in [0, 1] as a percentage: ``87.5%``."""
    return DASH if x is None else f"{100 * x:.1f}%"


def cell(value: Any, width: int = 80) -> str:
    """Any JSON value as a short table cell: numbers formatted, long strings and nested values cut."""
    if value is None or isinstance(value, bool | int | float):
        return num(value)
    if isinstance(value, str):
        text = value
    elif isinstance(value, list) and all(v is None or isinstance(v, bool | int | float | str) for v in value):
        shown = ", ".join(num(v) if not isinstance(v, str) else v for v in value[:8])
        text = f"[{shown}]" if len(value) <= 8 else f"[{shown}, … ({len(value)} values)]"
    else:
        text = json.dumps(value, default=str)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"
