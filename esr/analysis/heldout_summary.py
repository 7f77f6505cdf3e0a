"""The numbers ``esr probe heldout-kl`` reports and the files it writes: per target and position range the prompt
mean with its bootstrap 95% interval, and every later target against the first (paired; ``esr.analysis.bootstrap``).

    DIR/heldout_kl.json   settings, prompts' ids, per target: per-prompt values, means, intervals, comparisons
    DIR/heldout_kl.md     one table of means [95% interval], one of paired differences with their verdicts
    DIR/rollouts/         each target's rollouts (``<label>.safetensors``), to re-score or inspect
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from esr.analysis.bootstrap import LEVEL, RESAMPLES, SEED, Comparison, bootstrap_mean, paired_difference
from esr.analysis.rollout_scores import json_safe

if TYPE_CHECKING:
    from esr.analysis.heldout_kl import Settings, TargetKL

RANGE_TITLES = {"inside": "KL r < N", "beyond": "KL r >= N", "all": "KL all"}


def summarize(settings: Settings, results: list[TargetKL]) -> dict[str, Any]:
    """The JSON document: settings, and per target its per-prompt values, intervals and comparison with the first."""
    ranges = list(RANGE_TITLES)
    targets = []
    first = results[0]
    for i, r in enumerate(results):
        intervals = {k: asdict(bootstrap_mean(r.per_prompt[k])) for k in ranges}
        against = None if i == 0 else {k: _comparison(paired_difference(first.per_prompt[k], r.per_prompt[k]))
                                       for k in ranges}
        targets.append({**asdict(r), "mean_length": sum(r.lengths) / max(1, len(r.lengths)),
                        "intervals": intervals, "against_first": against})
    return json_safe({
        "settings": {**asdict(settings), "bootstrap": {"resamples": RESAMPLES, "level": LEVEL, "seed": SEED,
                                                      "over": "prompts"}},
        "reference": first.label, "targets": targets,
    })


def _comparison(c: Comparison) -> dict[str, Any]:
    return {**asdict(c.difference), "verdict": c.verdict}


def write_summary(summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """heldout_kl.json and heldout_kl.md in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "heldout_kl.json", out_dir / "heldout_kl.md"
    json_path.write_text(json.dumps(summary, indent=2))
    md_path.write_text(markdown(summary))
    return json_path, md_path


def _fmt(iv: dict[str, Any]) -> str:
    """``mean [low, high]`` (``n/a`` when no prompt defines it)."""
    if iv.get("mean") is None:
        return "n/a"
    if iv.get("low") is None:
        return f"{iv['mean']:.4g}"
    return f"{iv['mean']:.4g} [{iv['low']:.4g}, {iv['high']:.4g}]"


def _cells(t: dict[str, Any]) -> list[str]:
    iv = t["intervals"]
    return [t["label"], *(_fmt(iv[k]) for k in RANGE_TITLES), f"{t['mean_length']:.0f}", f"{t['cut_share']:.2f}",
            f"{t['seconds'].get('sample', 0) + t['seconds'].get('score', 0):.0f}"]


def _comparison_cells(t: dict[str, Any]) -> list[str]:
    return [t["label"], *(f"{_fmt(t['against_first'][k])} {t['against_first'][k]['verdict']}" for k in RANGE_TITLES)]


HEADERS = ["target", *RANGE_TITLES.values(), "mean length", "cut share", "seconds"]


def markdown(summary: dict[str, Any]) -> str:
    """Two markdown tables: means [95% interval] per target, and paired differences against the first target."""
    s = summary["settings"]
    lines = [
        "# Held-out reverse KL to the teacher",
        "",
        f"{s['prompts']} held-out prompts ({s['prompts_how']}), one rollout each to {s['max_new_tokens']} tokens "
        f"(seed {s['seed']}), scored by {s['teacher']}; N = {s['split']}. Per prompt the mean per-token reverse KL; "
        f"per target the mean over prompts with a percentile-bootstrap {s['bootstrap']['level']:.0%} interval over "
        f"prompts ({s['bootstrap']['resamples']} resamples).",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
        *("| " + " | ".join(_cells(t)) + " |" for t in summary["targets"]),
    ]
    later = [t for t in summary["targets"] if t["against_first"] is not None]
    if later:
        lines += ["", f"Paired difference against {summary['reference']} (target - reference, same prompts): mean "
                      "[95% interval] and verdict (`lower` / `higher`: the interval excludes 0).", "",
                  "| target | " + " | ".join(RANGE_TITLES.values()) + " |", "|---|" + "---|" * len(RANGE_TITLES),
                  *("| " + " | ".join(_comparison_cells(t)) + " |" for t in later)]
    return "\n".join(lines) + "\n"


def rich_tables(summary: dict[str, Any]) -> list[Table]:
    """The markdown's two tables for the terminal."""
    s = summary["settings"]
    means = Table(title=f"held-out reverse KL: {s['prompts']} prompts, T={s['max_new_tokens']}, N={s['split']} "
                        f"(mean [95% bootstrap interval])")
    for h in HEADERS:
        means.add_column(h, justify="left" if h == "target" else "right")
    for t in summary["targets"]:
        means.add_row(*_cells(t))
    tables = [means]
    later = [t for t in summary["targets"] if t["against_first"] is not None]
    if later:
        diff = Table(title=f"paired difference against {summary['reference']} (same prompts)")
        for h in ["target", *RANGE_TITLES.values()]:
            diff.add_column(h, justify="left" if h == "target" else "right")
        for t in later:
            diff.add_row(*_comparison_cells(t))
        tables.append(diff)
    return tables

