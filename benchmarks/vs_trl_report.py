"""The tables and ratios of benchmarks/vs_trl.py: per-arm summaries (mean and spread of the timed steps), the
markdown twin of the results file, and the esr / other ratios."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def summarise(result: dict[str, Any], batch: int) -> dict[str, Any]:
    timed = [r for r in result.get("steps", []) if not r["warmup"]]
    if not timed:
        return {}

    def mean(key: str) -> float:
        return sum(r[key] for r in timed) / len(timed)

    return {"s_per_step": mean("total_s"), "generate_s": mean("generate_s"), "score_s": mean("score_s"),
            "train_s": mean("train_s"), "cpu_s_per_step": mean("cpu_s"), "s_per_sample": mean("total_s") / batch,
            "tokens_per_step": mean("tokens_generated"), "timed_steps": len(timed),
            "s_per_step_min": min(r["total_s"] for r in timed), "s_per_step_max": max(r["total_s"] for r in timed),
            "generate_s_min": min(r["generate_s"] for r in timed),
            "generate_s_max": max(r["generate_s"] for r in timed)}


def _fmt(x: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def _spread(m: dict[str, Any], key: str) -> str:
    """The timed steps' range of ``key``, e.g. "(80.1-82.4)"; empty for results written before it was recorded."""
    lo, hi = m.get(f"{key}_min"), m.get(f"{key}_max")
    return "" if lo is None or hi is None else f"({lo:.1f}-{hi:.1f})"


def markdown(arms: list[dict[str, Any]], esr_n: int) -> str:
    lines = ["| arm | batch | new tokens | generate s (min-max) | score s | train s | **s/step** (min-max) | s/sample "
             "| CPU s/step | peak RSS, steps | peak RSS, process |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        m = a.get("summary") or {}
        if a["result"].get("status") != "ok":
            error = str(a["result"].get("error", "?")).replace("|", "/")[:80]
            lines.append(f"| {a['label']} | {a['batch']} | {a['tokens']} | failed: {error} |" + " |" * 7)
            continue
        r = a["result"]
        lines.append(
            f"| {a['label']} | {a['batch']} | {a['tokens']} | {_fmt(m.get('generate_s'))} {_spread(m, 'generate_s')} "
            f"| {_fmt(m.get('score_s'))} | {_fmt(m.get('train_s'))} | **{_fmt(m.get('s_per_step'))}** "
            f"{_spread(m, 's_per_step')} | {_fmt(m.get('s_per_sample'))} "
            f"| {_fmt(m.get('cpu_s_per_step'), '.1f')} | {_fmt(r.get('peak_rss_steps_gb'), '.1f', ' GB')} "
            f"| {_fmt(r.get('peak_rss_gb'), '.1f', ' GB')} |")
    ratios = ratio_rows(arms, esr_n)
    if ratios:
        lines += ["", "| ratio (esr / other) | time per step | peak RSS, steps | peak RSS, process |",
                  "|---|---|---|---|"]
        lines += [f"| {r['what']} | **{_fmt(r['time'], '.2f', 'x')}** | {_fmt(r['mem_steps'], '.2f', 'x')} "
                  f"| {_fmt(r['mem_process'], '.2f', 'x')} |" for r in ratios]
    return "\n".join(lines) + "\n"


def ratio_rows(arms: list[dict[str, Any]], esr_n: int) -> list[dict[str, Any]]:
    ok = [a for a in arms if a["result"].get("status") == "ok" and a.get("summary")]

    def find(name: str, tokens: int, batch: int) -> dict[str, Any] | None:
        return next((a for a in ok if a["arm"] == name and a["tokens"] == tokens and a["batch"] == batch), None)

    def ratio(x: float | None, y: float | None) -> float | None:
        return None if x is None or not y else x / y

    def row(what: str, e: dict[str, Any], o: dict[str, Any]) -> dict[str, Any]:
        return {"what": what, "time": ratio(e["summary"]["s_per_step"], o["summary"]["s_per_step"]),
                "mem_steps": ratio(e["result"].get("peak_rss_steps_gb"), o["result"].get("peak_rss_steps_gb")),
                "mem_process": ratio(e["result"].get("peak_rss_gb"), o["result"].get("peak_rss_gb"))}

    rows = []
    token_counts = sorted({a["tokens"] for a in ok})
    for e in [a for a in ok if a["runner"] == "esr"]:
        for o in ok:
            if o["arm"] != e["arm"] and o["tokens"] == e["tokens"] and o["batch"] == e["batch"]:
                rows.append(row(f"{e['label']} / {o['label']}, same work ({e['tokens']} tokens, batch {e['batch']})",
                                e, o))
    longest = max(token_counts, default=None)
    if longest is not None and longest != esr_n:  # the user-level comparison: ESR N against full-length TRL
        for e in [a for a in ok if a["runner"] == "esr" and a["tokens"] == esr_n]:
            for o in ok:
                if o["runner"] in ("trl", "floor") and o["tokens"] == longest and o["batch"] == e["batch"]:
                    rows.append(row(f"user level: {e['label']} / {o['label']} at max_new_tokens {longest} "
                                    f"(batch {e['batch']})", e, o))
    return rows


def write_results(out: Path, meta: dict[str, Any], arms: list[dict[str, Any]]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "arms": arms, "ratios": ratio_rows(arms, meta["esr_n"])}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, out)
    out.with_suffix(".md").write_text(markdown(arms, meta["esr_n"]))


def print_arm(entry: dict[str, Any]) -> None:
    """One line when an arm's process is done: its seconds per step by phase and its peak memory, or its failure."""
    label, m, result = entry["label"], entry["summary"], entry["result"]
    if result.get("status") == "ok":
        print(f"=== {label}: {m['s_per_step']:.2f} s/step (generate {m['generate_s']:.2f}, score "
              f"{m['score_s']:.2f}, train {m['train_s']:.2f}); peak RSS {_fmt(result.get('peak_rss_steps_gb'))}"
              f" GB in the steps, {result['peak_rss_gb']:.2f} GB in all; process wall {result['wall_s']:.0f} s",
              flush=True)
    else:
        print(f"=== {label}: FAILED ({result.get('error')}); going on with the other arms", flush=True)
