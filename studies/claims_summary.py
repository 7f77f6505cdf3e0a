"""The claims study's summary of one pair: numbers from each arm's run folder, as JSON, markdown tables and plots.

Everything here is read back from files esr wrote (metrics.jsonl, eval/history.jsonl, the base student's step-0
evaluation, analysis/cascade.json, modes/modes.json), so a summary can be rebuilt from a study folder at any time:

    python studies/claims_summary.py studies/runs/quickstart --pair quickstart [--into RESULTS.md]

``--into`` also writes the tables (the markdown without its title) into a page, between the lines
``<!-- claims_summary <name> -->`` and ``<!-- /claims_summary <name> -->``, so that the page quotes them verbatim
(the name is the pair's, or a variant's from ``claims.py --name``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib
import torch

from esr.analysis.cascade import kl_drop
from esr.analysis.rollout_scores import nan_to_none
from esr.report.collect import read_jsonl

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PHASES = ("generate", "score", "train", "align", "extrapolate")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file (none when it is missing); a line torn by a killed run is skipped."""
    return read_jsonl(path)[0] if path.is_file() else []


def _json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else None


def dense_drop(cascade: dict[str, Any]) -> dict[str, Any]:
    """The position-weighted KL drop beyond N (percent) over only the positions where at least half of the rollouts
    of both students are alive, and how many positions that is. Late positions, where one or two rollouts are alive,
    weigh as much as early ones in ``drop_beyond_pct``, and where an arm's rollouts all end early those positions
    drop out of its comparison (so its "before" mean differs from the other arms'); this leaves both effects out."""
    n, half = cascade["n"], cascade["rollouts"] / 2
    dense_R = (torch.tensor(cascade["alive_before"]) >= half) & (torch.tensor(cascade["alive_after"]) >= half)
    dense_R[:n] = False
    before_R, after_R = (torch.tensor([math.nan if v is None else v for v in cascade[k]], dtype=torch.float64)
                         .masked_fill(~dense_R, math.nan) for k in ("before", "after"))
    drop = kl_drop(before_R, after_R, n, len(before_R))  # the cascade's own formula, over the dense positions
    return {"drop_beyond_pct_half_alive": nan_to_none(drop), "positions_half_alive": int(dense_R.sum())}


def _opening(text: str, words: int = 3) -> str:
    return " ".join(text.split()[:words])


def answer_style(samples: Path, teacher_samples: Path) -> dict[str, float | None]:
    """How an evaluation's answers are written, from its samples.jsonl: ``opens_like_teacher``, the share whose
    first three words are those of the teacher's greedy answer to the same problem (None without the teacher's
    samples), and ``with_equals``, the share showing any working (an '=' anywhere: a GSM8K solution computes)."""
    rows = [r for r in _jsonl(samples) if r.get("sample", 0) == 0]
    if not rows:
        return {"opens_like_teacher": None, "with_equals": None}
    teacher = {r["id"]: _opening(r["response"]) for r in _jsonl(teacher_samples) if r.get("sample", 0) == 0}
    same = [_opening(r["response"]) == teacher[r["id"]] for r in rows if r["id"] in teacher]
    return {"opens_like_teacher": sum(same) / len(same) if same else None,
            "with_equals": sum("=" in r["response"] for r in rows) / len(rows)}


def arm_summary(run_dir: Path, base_eval: dict[str, Any] | None) -> dict[str, Any]:
    """One arm: training cost and KL, held-out accuracy over steps (step 0 = the base student), answer style,
    cascade drops."""
    metrics = _jsonl(run_dir / "metrics.jsonl")
    history = _jsonl(run_dir / "eval" / "history.jsonl")
    cascade = _json(run_dir / "analysis" / "cascade.json")
    k = min(3, len(metrics))
    keys = ("accuracy", "length_p10", "length_p50", "length_p90", "cut_share", "multi_box_share",
            "repeated_4gram_share", "relaxed_accuracy")
    evals = [{"step": 0, **{key: base_eval.get(key) for key in keys}}] if base_eval else []
    evals += [{key: h.get(key) for key in ("step", *keys, "collapse_warning")} for h in history]
    teacher = run_dir.parent / "teacher-eval" / "samples.jsonl"
    for e in evals:
        folder = run_dir.parent / "base-eval" if e["step"] == 0 else run_dir / "eval" / f"step-{e['step']:06d}"
        e.update(answer_style(folder / "samples.jsonl", teacher))
    return {
        "steps": len(metrics),
        "seconds_per_step": {p: _mean([m.get(f"seconds_{p}", 0.0) for m in metrics]) for p in PHASES},
        "seconds_per_step_total": _mean([sum(m.get(f"seconds_{p}", 0.0) for p in PHASES) for m in metrics]),
        "tflops_per_step": _mean([sum(m.get(f"flops_{p}", 0.0) for p in PHASES) / 1e12 for m in metrics]),
        "horizon": [m["horizon"] for m in metrics],
        "response_len_mean": _mean([m["response_len_mean"] for m in metrics]),
        "cut_share": _mean([m["cut_share"] for m in metrics]),
        "trained_share": _mean([m.get("trained_share", 1.0) for m in metrics]),
        "kl_first3": _mean([m["kl"] for m in metrics[:k]]),
        "kl_last3": _mean([m["kl"] for m in metrics[len(metrics) - k:]]),
        "kl": [m["kl"] for m in metrics],
        "skipped_steps": sum(bool(m.get("skipped")) for m in metrics),
        "evals": evals,
        "best_accuracy": max((e["accuracy"] for e in evals if e["accuracy"] is not None), default=None),
        "final_accuracy": evals[-1]["accuracy"] if evals else None,
        "collapse_warnings": sum(bool(e.get("collapse_warning")) for e in evals),
        "extrapolation": [{k: e.get(k) for k in ("step", "score_before", "score_after", "alphas_accepted", "tries")}
                          for e in _jsonl(run_dir / "extrapolate" / "events.jsonl")],
        "cascade": None if cascade is None else {
            "n": cascade["n"], "drop_in_pct": cascade["drop_in_pct"], "drop_beyond_pct": cascade["drop_beyond_pct"],
            "drop_beyond_pct_tokens": cascade["drop_beyond_pct_tokens"], "means": cascade["means"],
            "before": cascade["before"], "after": cascade["after"], **dense_drop(cascade)},
    }


def longer_caps(out: Path, arms: list[str]) -> list[dict[str, Any]]:
    """Evaluations re-judged under a longer cap by studies/longer_cap.py (``<eval dir>/cap-<cap>/summary.json``)."""
    rows = []
    folders = [("base student", out / "base-eval"), ("teacher", out / "teacher-eval")]
    folders += [(f"{a}/{d.name}", d) for a in arms for d in sorted((out / a / "eval").glob("step-*"))]
    for label, folder in folders:
        for path in sorted(folder.glob("cap-*/summary.json"), key=lambda p: int(p.parent.name[4:])):
            s = _json(path)
            rows.append({"name": label, **{k: s.get(k) for k in (
                "max_new_tokens", "previous_max_new_tokens", "previous_accuracy", "accuracy", "relaxed_accuracy",
                "cut_share", "length_p50", "regenerated", "n_problems")}})
    return rows


def summarize_pair(out: Path, arms: list[str], pair: str) -> dict[str, Any]:
    base_eval = _json(out / "base-eval" / "summary.json")
    modes = _json(out / "modes" / "modes.json")
    return {
        "pair": pair,
        "study": _json(out / "study.json"),
        "base_eval": base_eval,
        "teacher_eval": _json(out / "teacher-eval" / "summary.json"),
        "teacher_style": answer_style(out / "teacher-eval" / "samples.jsonl", out / "teacher-eval" / "samples.jsonl"),
        "arms": {a: arm_summary(out / a, base_eval) for a in arms if (out / a / "metrics.jsonl").is_file()},
        "longer_caps": longer_caps(out, arms),
        "modes": modes,
        "modes_markdown": (out / "modes" / "modes.md").read_text() if (out / "modes" / "modes.md").is_file() else None,
    }


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def _evaluation_lines(arms: dict[str, Any]) -> list[str]:
    """Each evaluation of each arm: accuracy, cut share, lengths, answer style."""
    lines: list[str] = []
    lines += ["", "Each evaluation in detail (cut: share of answers that hit the token cap, so count as wrong; "
              "relaxed: the gold answer anywhere in the text; opens like the teacher: the first three words are those "
              "of the teacher's answer to the same problem; with '=': the answer shows any working):", "",
              "| arm | step | accuracy | relaxed | cut | length p10 / p50 / p90 | repeated 4-grams | opens like "
              "the teacher | with '=' |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, a in arms.items():
        for e in a["evals"]:
            lines.append(f"| {name} | {e['step']} | {_f(e['accuracy'])} | {_f(e.get('relaxed_accuracy'))} | "
                         f"{_f(e.get('cut_share'), '.2f')} | {_f(e.get('length_p10'), '.0f')} / "
                         f"{_f(e.get('length_p50'), '.0f')} / {_f(e.get('length_p90'), '.0f')} | "
                         f"{_f(e.get('repeated_4gram_share'), '.3f')} | {_f(e.get('opens_like_teacher'), '.2f')} | "
                         f"{_f(e.get('with_equals'), '.2f')} |")
    return lines


def _longer_cap_lines(longer_caps: list[dict[str, Any]]) -> list[str]:
    """The evaluations re-judged under a longer token cap, if any were."""
    lines: list[str] = []
    if longer_caps:
        lines += ["", "The same evaluations under a longer token cap (`studies/longer_cap.py`: only the answers the "
                  "first cap cut were generated again):", "",
                  "| model | cap | accuracy | cap | accuracy | relaxed | cut | median length | regenerated |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in longer_caps:
            lines.append(f"| {r['name']} | {r['previous_max_new_tokens']} | {_f(r['previous_accuracy'])} | "
                         f"{r['max_new_tokens']} | {_f(r['accuracy'])} | {_f(r['relaxed_accuracy'])} | "
                         f"{_f(r['cut_share'], '.2f')} | {_f(r['length_p50'], '.0f')} | "
                         f"{r['regenerated']} of {r['n_problems']} |")
    return lines


def _extrapolation_lines(arms: dict[str, Any]) -> list[str]:
    """EffOPD's jumps at each scheduled step, for the arms that extrapolate."""
    lines: list[str] = []
    jumps = {name: a["extrapolation"] for name, a in arms.items() if a.get("extrapolation")}
    if jumps:
        lines += ["", "EffOPD extrapolation at each scheduled step (probe: the held-out reverse KL the jump is judged "
                  "on; a jump is kept only if it lowers it):", "",
                  "| arm | step | jumps tried | alphas kept | probe KL before -> after |", "|---|---:|---:|---|---:|"]
        for name, events in jumps.items():
            for e in events:
                kept = ", ".join(f"{x:.2f}" for x in e["alphas_accepted"] or []) or "none"
                lines.append(f"| {name} | {e['step']} | {e['tries']} | {kept} | {_f(e['score_before'])} -> "
                             f"{_f(e['score_after'])} |")
    return lines


def _phase_lines(arms: dict[str, Any]) -> list[str]:
    """Seconds per step by phase."""
    lines: list[str] = []
    lines += ["", "Time per step by phase (s):", "", "| arm | " + " | ".join(PHASES) + " |",
              "|---|" + "---:|" * len(PHASES)]
    for name, a in arms.items():
        lines.append(f"| {name} | " + " | ".join(_f(a["seconds_per_step"][p], ".1f") for p in PHASES) + " |")
    return lines


def _cascade_lines(arms: dict[str, Any]) -> list[str]:
    """Per-arm cascade drops, for pairs with a cascade."""
    lines: list[str] = []
    if any(a["cascade"] for a in arms.values()):
        lines += ["", "Cascade: per-position KL to the teacher on held-out prompts, base vs trained student "
                  "(position-weighted, the same window [0, N) for every arm; the paper saw 30-40% beyond N):", "",
                  "| arm | window N | KL before -> after inside | drop inside | KL before -> after beyond | "
                  "drop beyond | drop beyond (token-weighted) | drop beyond, half alive (positions) |",
                  "|---|---:|---|---:|---|---:|---:|---:|"]
        for name, a in arms.items():
            c = a["cascade"]
            if c:
                m = c["means"]
                lines.append(f"| {name} | {c['n']} | {_f(m['before_in'])} -> {_f(m['after_in'])} | "
                             f"{_f(c['drop_in_pct'], '.1f')}% | {_f(m['before_beyond'])} -> {_f(m['after_beyond'])}"
                             f" | {_f(c['drop_beyond_pct'], '.1f')}% | {_f(c['drop_beyond_pct_tokens'], '.1f')}% | "
                             f"{_f(c['drop_beyond_pct_half_alive'], '.1f')}% ({c['positions_half_alive']}) |")
    return lines


def markdown(summary: dict[str, Any]) -> str:
    """The pair's tables as markdown: accuracy per arm, each evaluation, longer caps, EffOPD jumps, time per phase,
    cascade and modes."""
    arms = summary["arms"]
    steps = sorted({e["step"] for a in arms.values() for e in a["evals"]})
    lines = [f"# Claims study, pair `{summary['pair']}`", ""]
    if summary.get("teacher_eval"):
        style = summary.get("teacher_style") or {}
        lines += [f"Teacher accuracy on the same problems: {_f(summary['teacher_eval']['accuracy'])} (answers with "
                  f"'=': {_f(style.get('with_equals'), '.2f')}).", ""]
    lines += ["Held-out accuracy (GSM8K test, greedy; step 0 is the base student). Share trained: the share of "
              "generated tokens the loss covered (under 1 where a token selection keeps some, or where a "
              "cross-tokenizer pair leaves out tokens the two tokenizers cut differently). Train KL is the mean over "
              "the tokens the loss covered, so an arm that keeps its highest-KL tokens shows a higher one:", "",
              "| arm | steps run | " + " | ".join(f"step {s}" for s in steps) + " | best | train KL first 3 -> "
              "last 3 | s/step | TFLOPs/step | mean response len | share trained | collapse warnings |",
              "|---|---:|" + "---:|" * (len(steps) + 7)]
    for name, a in arms.items():
        by_step = {e["step"]: e["accuracy"] for e in a["evals"]}
        lines.append(f"| {name} | {a['steps']} | " + " | ".join(_f(by_step.get(s)) for s in steps)
                     + f" | {_f(a['best_accuracy'])} | {_f(a['kl_first3'])} -> {_f(a['kl_last3'])} | "
                     f"{_f(a['seconds_per_step_total'], '.1f')} | {_f(a['tflops_per_step'], '.1f')} | "
                     f"{_f(a['response_len_mean'], '.0f')} | {_f(a['trained_share'], '.2f')} | "
                     f"{a['collapse_warnings']} |")
    lines += _evaluation_lines(arms)
    lines += _longer_cap_lines(summary.get("longer_caps") or [])
    lines += _extrapolation_lines(arms)
    lines += _phase_lines(arms)
    lines += _cascade_lines(arms)
    if summary.get("modes_markdown"):
        lines += ["", summary["modes_markdown"].replace("# Modes", "## Modes")]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Accuracy over steps, training KL over steps, the share of answers showing working over steps, and (where the
    pair has one) each arm's cascade (after / before per position)."""
    arms = summary["arms"]
    has_cascade = any(a["cascade"] for a in arms.values())
    fig, axes = plt.subplots(1, 4 if has_cascade else 3, figsize=(21 if has_cascade else 16, 4.5))
    for name, a in arms.items():
        evals = [e for e in a["evals"] if e["accuracy"] is not None]
        axes[0].plot([e["step"] for e in evals], [e["accuracy"] for e in evals], marker="o", label=name)
        axes[1].plot(range(1, len(a["kl"]) + 1), a["kl"], label=name)
        working = [e for e in a["evals"] if e.get("with_equals") is not None]
        axes[2].plot([e["step"] for e in working], [e["with_equals"] for e in working], marker="o", label=name)
        c = a["cascade"]
        if c:
            w = 32  # ratio of window means: few rollouts are alive at late positions, where KL can be ~0
            pairs = [(af, bf) for af, bf in zip(c["after"], c["before"], strict=True)]
            smooth = []
            for i in range(len(pairs)):
                win = [(af, bf) for af, bf in pairs[max(0, i - w):i + 1] if af is not None and bf is not None]
                b = sum(bf for _, bf in win)
                smooth.append(sum(af for af, _ in win) / b if win and b > 0 else math.nan)
            axes[3].plot(smooth, label=f"{name} (N={c['n']})")
            axes[3].axvline(c["n"], color="grey", ls=":", lw=0.8)
    axes[0].set(title="held-out accuracy (GSM8K test)", xlabel="step", ylabel="accuracy")
    axes[1].set(title="training KL (own rollouts)", xlabel="step", ylabel="mean reverse KL per trained token")
    axes[2].set(title="held-out answers showing working (an '=')", xlabel="step", ylabel="share of answers",
                ylim=(-0.05, 1.05))
    if has_cascade:
        axes[3].set(title="cascade: held-out KL after / before training", xlabel="response position",
                    ylabel="ratio of 32-position window means", ylim=(0, 2.5))
        axes[3].axhline(1.0, color="grey", lw=0.8)
        axes[3].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"claims study, pair {summary['pair']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_summary(summary: dict[str, Any], results: Path, pair: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{pair}.json").write_text(json.dumps(summary, indent=1, default=str))
    (results / f"{pair}.md").write_text(markdown(summary))
    if summary["arms"]:
        plot(summary, results / f"{pair}.png")


def splice(page: Path, pair: str, md: str) -> None:
    """Replace what lies between ``<!-- claims_summary <pair> -->`` and ``<!-- /claims_summary <pair> -->`` in page
    with md less its ``# `` title line; the markers stay, so splicing again replaces the same block."""
    begin, end = f"<!-- claims_summary {pair} -->", f"<!-- /claims_summary {pair} -->"
    text = page.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise SystemExit(f"{page}: needs one line {begin!r} followed by one line {end!r} around the tables to "
                         f"replace (found {text.count(begin)} and {text.count(end)})")
    body = "\n".join(line for line in md.splitlines() if not line.startswith("# ")).strip()
    head, rest = text.split(begin)
    page.write_text(head + begin + "\n\n" + body + "\n\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", help="a study folder (studies/runs/<pair>)")
    ap.add_argument("--pair", required=True)
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--into", type=Path, help="a page (e.g. RESULTS.md) whose claims_summary markers for this pair "
                    "get the tables")
    a = ap.parse_args()
    study = _json(Path(a.study) / "study.json") or {}
    name = (study.get("args") or {}).get("name") or a.pair  # a variant (claims.py --name) keeps its own name
    summary = summarize_pair(Path(a.study), study.get("arms", []), a.pair)
    write_summary(summary, Path(a.results), name)
    if a.into:
        splice(a.into, name, markdown(summary))
