"""The report's content: one function per section, each appending blocks to the Document."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime

from esr import plots
from esr.report import analysis, figures
from esr.report.collect import PHASES, RunData
from esr.report.doc import Block, Bullets, Document, Heading, Image, Table, Text
from esr.report.fmt import DASH, flops, gigabytes, num, seconds, share
from esr.report.horizon import horizon_section

EVAL_EXTRA_KEYS = ("relaxed_accuracy", "length_p50", "cut_share", "repeated_4gram_share", "multi_box_share")
"""Evaluation keys plotted next to the run's metric when recorded (collapse signals among them)."""
EVAL_TABLE_CAP = 40


def build_document(runs: Sequence[RunData], extra: Sequence[analysis.AnalysisItem] = (),
                   title: str | None = None) -> Document:
    """The whole report for ``runs`` (and explicitly given analysis outputs ``extra``)."""
    names = ", ".join(r.name for r in runs)
    doc = Document(title=title or f"esr report: {names}",
                   subtitle=f"{len(runs)} run{'s' * (len(runs) > 1)} · generated {datetime.now():%Y-%m-%d %H:%M}")
    if not plots.available():
        doc.add(Text("Plots are left out: matplotlib is not installed (pip install matplotlib).", tone="warn"))
    for section in (runs_section, curves_section, horizon_section, eval_section, time_section, compute_section,
                    extrapolation_section, guard_section):
        section(doc, runs)
    analyses_section(doc, runs, extra)
    return doc


def _image(name: str, png: bytes | None, alt: str, caption: str | None = None) -> list[Block]:
    """An Image block, or nothing when the plot was not drawn."""
    return [Image(name=name, png=png, alt=alt, caption=caption)] if png else []


def horizon_text(run: RunData) -> str:
    """The rollout horizon as configured (``esr (N=100, T=512)``), with the range used when it varied."""
    kind, t = run.cfg("rollout.horizon", "?"), run.cfg("rollout.max_new_tokens", "?")
    text = {
        "esr": f"esr (N={run.cfg('rollout.n')}, T={t})",
        "full": f"full (T={t})",
        "progressive": f"progressive (H0={run.cfg('rollout.h0')}, +{run.cfg('rollout.dh')} every "
                       f"{run.cfg('rollout.every')} steps, T={t})",
        "ratio": f"ratio (rho={run.cfg('rollout.rho')}, T={t})",
        "auto": f"auto (from N={run.cfg('rollout.n')}, share {run.cfg('rollout.auto.share')}, probes every "
                f"{run.cfg('rollout.auto.every')} steps, T={t})",
    }.get(kind, f"{kind} (T={t})")
    _, used = run.series("horizon")
    if used and min(used) != max(used):
        text += f", used {min(used):.0f}–{max(used):.0f}"
    return text


def loss_text(run: RunData) -> str:
    """Loss kind (with beta for JSD) and the cross-tokenizer mode when there is one."""
    kind = run.cfg("loss.kind", "?")
    text = f"{kind} (beta={run.cfg('loss.beta')})" if kind == "jsd" else str(kind)
    cross = run.cfg("loss.cross_tokenizer")
    return f"{text} / {cross}" if cross else text


def finetune_text(run: RunData) -> str:
    """``lora (r=32, alpha=64)`` or ``full``."""
    mode = run.cfg("train.finetune", "?")
    return f"lora (r={run.cfg('lora.r')}, alpha={run.cfg('lora.alpha')})" if mode == "lora" else str(mode)


def best_text(run: RunData) -> str:
    """``accuracy 0.42 @ step 150``, or a dash without evaluations."""
    if not run.best:
        return DASH
    return f"{run.best.get('metric', run.eval_metric)} {num(run.best.get('value'))} @ step {run.best.get('step')}"


def runs_section(doc: Document, runs: Sequence[RunData]) -> None:
    """(1) One row per run: models, horizon, loss, fine-tuning, steps done, best evaluation."""
    doc.add(Heading(2, "Runs"))
    rows = [[r.name, str(r.cfg("student.name", "?")), str(r.cfg("teacher.name", "?")), horizon_text(r), loss_text(r),
             finetune_text(r), f"{r.steps_done} / {r.cfg('train.steps', '?')}", best_text(r),
             f"{r.info.get('device', '?')} {r.info.get('dtype', '')}".strip()] for r in runs]
    doc.add(Table(columns=["run", "student", "teacher", "horizon", "loss", "finetune", "steps", "best eval", "device"],
                  rows=rows, swatches=[r.color for r in runs]))
    doc.add(Bullets([f"{r.name}: {r.path.resolve()}" for r in runs], tone="muted"))
    notes = [f"{r.name}: {note}" for r in runs for note in r.notes]
    notes += [f"{r.name}: {n} step{'s' * (n > 1)} skipped (non-finite loss or gradient)"
              for r in runs if (n := sum(bool(m.get("skipped")) for m in r.metrics))]
    if notes:
        doc.add(Bullets(notes, tone="warn"))


def _first_last(run: RunData, key: str) -> str:
    """``first → last`` of a metric over steps."""
    _, values = run.series(key)
    finite = [v for v in values if math.isfinite(v)]
    return f"{num(finite[0])} → {num(finite[-1])}" if finite else DASH


def curves_section(doc: Document, runs: Sequence[RunData]) -> None:
    """(2) Loss and mean KL over steps, all runs on one plot each, and their first and last values."""
    doc.add(Heading(2, "Loss and KL"))
    if plots.available():
        doc.add(*_image("loss", figures.line_plot(runs, "loss", "training loss"), "training loss over steps"))
        doc.add(*_image("kl", figures.line_plot(runs, "kl", "mean reverse KL per token"), "mean KL over steps"))
    rows = [[r.name, _first_last(r, "loss"), _first_last(r, "kl"), _first_last(r, "response_len_mean"),
             share(r.mean("cut_share")), num(r.mean("grad_norm"))] for r in runs]
    doc.add(Table(columns=["run", "loss (first → last)", "KL (first → last)", "response length (first → last)",
                           "cut by horizon (mean)", "grad norm (mean)"], rows=rows, swatches=[r.color for r in runs]))


def _eval_keys(runs: Sequence[RunData]) -> list[str]:
    """Each run's metric first, then the recorded extras (collapse signals), at most six panels."""
    present = {k for r in runs for row in r.evals for k in row}
    keys = list(dict.fromkeys(r.eval_metric for r in runs if r.evals))
    keys += [k for k in EVAL_EXTRA_KEYS if k in present and k not in keys]
    return keys[:6]


def eval_section(doc: Document, runs: Sequence[RunData]) -> None:
    """(3) Evaluation metrics over steps with the best point starred, a table per evaluation, collapse warnings."""
    doc.add(Heading(2, "Evaluation"))
    evaluated = [r for r in runs if r.evals]
    if not evaluated:
        doc.add(Text("No run has eval/history.jsonl: train with eval.every > 0 to evaluate during training.",
                     tone="muted"))
        return
    keys = _eval_keys(evaluated)
    if plots.available():
        doc.add(*_image("eval", figures.eval_plot(evaluated, keys), "evaluation metrics over steps",
                        "★ marks each run's best evaluation by its metric"))
    rows, swatches = [], []
    for r in evaluated:
        for e in r.evals:
            mark = " ★" if r.best and e["step"] == r.best.get("step") else ""
            rows.append([r.name, f"{e['step']}{mark}", *(num(e.get(k)) for k in keys),
                         "yes" if e.get("collapse_warning") else ""])
            swatches.append(r.color)
    doc.add(Table(columns=["run", "step", *keys, "collapse warning"], rows=rows[:EVAL_TABLE_CAP],
                  swatches=swatches[:EVAL_TABLE_CAP]))
    if len(rows) > EVAL_TABLE_CAP:
        doc.add(Text(f"showing the first {EVAL_TABLE_CAP} of {len(rows)} evaluations", tone="muted"))
    warnings = [f"{r.name}, step {e['step']}: {e['collapse_warning']}" for r in evaluated for e in r.evals
                if e.get("collapse_warning")]
    doc.add(Heading(3, "Collapse warnings"))
    doc.add(Bullets(warnings, tone="warn") if warnings else Text("No collapse warnings.", tone="muted"))
    missing = [r.name for r in runs if not r.evals]
    if missing:
        doc.add(Text(f"Not evaluated during training: {', '.join(missing)}.", tone="muted"))


def wall_seconds(run: RunData) -> float:
    """Total seconds of the recorded phases over all steps (evaluation and checkpointing not included)."""
    return math.fsum(run.total(f"seconds_{p}") or 0.0 for p in PHASES)


def time_section(doc: Document, runs: Sequence[RunData]) -> None:
    """(4) Mean seconds per step by phase, stacked per run, and peak memory."""
    doc.add(Heading(2, "Time and memory per step"))
    if plots.available():
        doc.add(*_image("phases", figures.phase_plot(runs), "seconds per step by phase and peak memory per run"))
    rows = [[r.name, *(seconds(r.mean(f"seconds_{p}")) for p in PHASES), seconds(wall_seconds(r) / len(r.metrics)),
             gigabytes(max(r.series("peak_mem_gb")[1], default=None))] for r in runs]
    doc.add(Table(columns=["run", *(f"{p} s/step" for p in PHASES), "total s/step", "peak memory"], rows=rows,
                  swatches=[r.color for r in runs]))


def compute_section(doc: Document, runs: Sequence[RunData]) -> None:
    """(5) Totals per run: tokens generated and scored, FLOPs by phase when recorded, wall seconds."""
    doc.add(Heading(2, "Compute totals"))
    flop_phases = [p for p in PHASES if any(r.total(f"flops_{p}") is not None for r in runs)]
    columns = ["run", "steps", "tokens generated", "tokens scored", "trained share"]
    columns += [f"FLOPs {p}" for p in flop_phases] + (["FLOPs total"] if flop_phases else [])
    columns += ["wall time (phases)", "tokens generated / s"]
    rows = []
    for r in runs:
        generated, scored, wall = r.total("tokens_generated"), r.total("tokens_scored"), wall_seconds(r)
        by_phase = [r.total(f"flops_{p}") for p in flop_phases]
        total_flops = [math.fsum(f for f in by_phase if f is not None) if any(f is not None for f in by_phase)
                       else None] if flop_phases else []
        rows.append([r.name, num(len(r.metrics)), num(_int(generated)), num(_int(scored)),
                     share(scored / generated if generated and scored is not None else None),
                     *(flops(f) for f in by_phase + total_flops), seconds(wall),
                     num(round(generated / wall, 1)) if generated and wall else DASH])
    doc.add(Table(columns=columns, rows=rows, swatches=[r.color for r in runs]))
    if not flop_phases:
        doc.add(Text("FLOPs were not recorded by these runs (metrics.jsonl without flops_* fields).", tone="muted"))


def extrapolation_section(doc: Document, runs: Sequence[RunData]) -> None:
    """(5b) EffOPD: one row per extrapolation of each run that had them (absent otherwise)."""
    runs = [r for r in runs if r.extrapolation]
    if not runs:
        return
    doc.add(Heading(2, "Extrapolation (EffOPD)"))
    rows = [[r.name, num(e["step"]), num(e.get("tries")),
             ", ".join(f"{a:.3g}" for a in e.get("alphas_accepted", [])) or DASH,
             num(e.get("score_before")), num(e.get("score_after")), seconds(e.get("seconds"))]
            for r in runs for e in r.extrapolation]
    doc.add(Table(columns=["run", "after step", "tries", "accepted alphas", "probe before", "probe after",
                           "seconds"], rows=rows))
    doc.add(Text("probe: mean reverse KL on fixed held-out rollouts (or minus eval.metric with "
                 "optim.extrapolate.probe=eval); lower is better", tone="muted"))


def guard_section(doc: Document, runs: Sequence[RunData]) -> None:
    """(5c) The collapse guard: one row per tripped signal of each run that had one (absent otherwise)."""
    runs = [r for r in runs if r.guard]
    if not runs:
        return
    doc.add(Heading(2, "Collapse guard"))
    rows = [[r.name, num(e["step"]), str(e.get("signal", "?")), num(e.get("value")), num(e.get("baseline")),
             num(e.get("threshold")), str(e.get("action", "?")), num(e.get("lr_scale"))]
            for r in runs for e in r.guard]
    doc.add(Table(columns=["run", "step", "signal", "value", "baseline", "threshold", "action", "lr scale before"],
                  rows=rows))
    doc.add(Text("train.guard: each signal against its own early baseline (esr/train/guard.py); rollback: the run "
                 "went back to its last checkpoint before that step with the learning rate x train.guard.lr_factor; "
                 "the steps it left are in guard/rolled-back-metrics.jsonl", tone="muted"))


def _int(x: float | None) -> int | None:
    """A float total of integer counts back as an int."""
    return None if x is None else int(round(x))


def analyses_section(doc: Document, runs: Sequence[RunData], extra: Sequence[analysis.AnalysisItem]) -> None:
    """(6) Probe and analysis outputs found in the run folders, and those given explicitly."""
    doc.add(Heading(2, "Analyses"))
    found = [(r, item) for r in runs for item in analysis.discover(r.path)]
    if not found and not extra:
        doc.add(Text("No analysis outputs found (analysis/*.json, kl_profile.json, decay.json and their PNGs).",
                     tone="muted"))
    for i, (r, item) in enumerate(found):
        doc.add(*analysis.render(item, f"{r.name} · {item.label}", f"analysis{i}-{r.name}"))
    for i, item in enumerate(extra):
        doc.add(*analysis.render(item, item.label, f"extra{i}"))
