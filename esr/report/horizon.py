"""The report's horizon section: N over steps for every run, and the probes of ``rollout.horizon=auto`` runs
(auto/profile.jsonl: when N moved, the probe's KL and its cost, the last running KL profile)."""

from __future__ import annotations

from collections.abc import Sequence

from esr import plots
from esr.report import figures
from esr.report.collect import RunData
from esr.report.doc import Document, Heading, Image, Table, Text
from esr.report.fmt import num, seconds, share

PROBE_TABLE_CAP = 40
"""Probe rows shown per run (the last ones)."""


def horizon_section(doc: Document, runs: Sequence[RunData]) -> None:
    """N (the horizon each step sampled to) over steps for every run; for auto runs the probes and the profile."""
    doc.add(Heading(2, "Horizon N"))
    if plots.available():
        png = figures.line_plot(runs, "horizon", "horizon N (max new tokens of the step)")
        if png:
            doc.add(Image(name="horizon", png=png, alt="horizon N over steps"))
    auto = [r for r in runs if r.auto_profile]
    if not auto:
        return
    rows = [[r.name, num(p["step"]), f"{p.get('n_before', '?')} → {p.get('n', '?')}", num(p.get("probe_kl")),
             num(p.get("probe_tokens")), seconds(p.get("seconds"))]
            for r in auto for p in r.auto_profile[-PROBE_TABLE_CAP:]]
    doc.add(Table(columns=["run", "before step", "N", "probe KL per token", "probe tokens", "seconds"], rows=rows))
    shares = [f"{r.name}: {share(r.series('probe_share')[1][-1])}" for r in auto if r.series("probe_share")[1]]
    doc.add(Text("rollout.horizon=auto: N = the first position holding rollout.auto.share of the running KL mass "
                 "(token-mass rule); probes' share of the run's time: " + ("; ".join(shares) or "?"), tone="muted"))
    if plots.available():
        doc.add(Image(name="auto-profile", png=figures.auto_profile_plot(auto),
                      alt="last auto-horizon KL profile of each run"))
