"""What a person watching a run sees: a live bar with ETA, loss and KL, and the closing summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from esr.progress import progress_bar
from esr.train.metrics import StepMetrics

console = Console(stderr=True)


class RunProgress:
    """A rich progress bar on a terminal; one plain line per step otherwise (CI logs, files)."""

    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self.progress = progress_bar(self.live, stats=True, console=console)
        self.task = self.progress.add_task("train", total=total, completed=start, stats="")
        if self.live:
            self.progress.start()

    def update(self, m: StepMetrics) -> None:
        stats = f"loss {m.loss:.4f}  kl {m.kl:.4f}  H {m.horizon}  len {m.response_len_mean:.0f}"
        if m.by_source:  # data.mix: each source's KL, by its own teacher
            stats += "  (" + ", ".join(f"{name} {v['kl']:.4f}" for name, v in m.by_source.items()) + ")"
        if m.probe_share is not None:  # rollout.horizon=auto: the probes' share of the run's time so far
            stats += f"  probe {100 * m.probe_share:.0f}%"
            stats += f" (kl {m.probe_kl:.4f})" if m.probe_kl is not None else ""
        if m.skipped:
            stats += "  [red]skipped (non-finite)"
        self.progress.update(self.task, completed=m.step, stats=stats)
        if self.enabled and not self.live:
            secs = m.seconds_generate + m.seconds_score + m.seconds_train + m.seconds_align
            console.print(f"step {m.step}/{self.progress.tasks[0].total}  {stats}  {secs:.1f}s", highlight=False)

    def note(self, text: str) -> None:
        """A line between steps (an evaluation result), above the live bar or in the plain log."""
        if self.enabled:
            console.print(text, highlight=False)

    def close(self) -> None:
        if self.live:
            self.progress.stop()


def summary_table(metrics: list[dict[str, Any]], run_dir: Path, window: int = 3) -> Table:
    """Steps, mean KL over the first vs last ``window`` steps, mean seconds per phase, total FLOPs, where the run is."""
    table = Table(title="esr run summary", show_header=False)
    if not metrics:
        table.add_row("steps", "0")
        table.add_row("run folder", str(run_dir))
        return table
    ok = [m for m in metrics if not m["skipped"]] or metrics
    first, last = ok[:window], ok[-window:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    table.add_row("steps", f"{metrics[-1]['step']} ({len(metrics) - len(ok)} skipped)")
    table.add_row(f"mean KL, first {len(first)} steps", f"{mean(first, 'kl'):.4f}")
    table.add_row(f"mean KL, last {len(last)} steps", f"{mean(last, 'kl'):.4f}")
    for name in dict.fromkeys(n for m in ok for n in (m.get("by_source") or {})):  # data.mix: KL per source
        kls = [m["by_source"][name]["kl"] for m in ok if name in (m.get("by_source") or {})]
        table.add_row(f"mean KL of {name}, first -> last {window} steps",
                      f"{sum(kls[:window]) / len(kls[:window]):.4f} -> {sum(kls[-window:]) / len(kls[-window:]):.4f}")
    for phase in ("generate", "score", "train"):
        table.add_row(f"seconds per step: {phase}", f"{mean(metrics, 'seconds_' + phase):.2f}")
    align = [m.get("seconds_align", 0.0) for m in metrics]  # absent in runs started before esr had it
    if any(align):  # a cross-tokenizer run
        table.add_row("seconds per step: align", f"{sum(align) / len(align):.3f}")
    extrapolate = [m.get("seconds_extrapolate", 0.0) for m in metrics]
    if any(extrapolate):
        table.add_row("seconds extrapolating (EffOPD)", f"{sum(extrapolate):.1f} in total")
    horizons = [m["horizon"] for m in metrics if "horizon" in m]  # absent in lines from before esr logged it
    if horizons and (min(horizons) != max(horizons) or metrics[-1].get("probe_share") is not None):
        table.add_row("horizon N: first -> last (min-max)",
                      f"{horizons[0]} -> {horizons[-1]} ({min(horizons)}-{max(horizons)})")
    if metrics[-1].get("probe_share") is not None:  # rollout.horizon=auto
        table.add_row("auto-horizon probes", f"{sum(m.get('probe_seconds', 0.0) for m in metrics):.1f} s, "
                                             f"{100 * metrics[-1]['probe_share']:.1f}% of the run's time")
    table.add_row("tokens generated per step", f"{mean(metrics, 'tokens_generated'):.0f}")
    scored = sum(m["tokens_scored"] for m in metrics) / max(1, sum(m["tokens_generated"] for m in metrics))
    if scored < 1:
        table.add_row("share of tokens trained", f"{100 * scored:.1f}%")
    compute = compute_summary(metrics)
    if compute:
        table.add_row("compute", compute)
    table.add_row("peak memory", f"{max(m['peak_mem_gb'] for m in metrics):.1f} GB")
    table.add_row("run folder", str(run_dir))
    return table


def compute_summary(metrics: list[dict[str, Any]]) -> str | None:
    """Total approximate FLOPs of the run and each phase's share, e.g. "1.2e+15 FLOPs (gen 10%, score 30%, train
    60%)"; None when no line has them (runs logged before esr counted FLOPs)."""
    phases = (("gen", "generate"), ("score", "score"), ("train", "train"), ("extrapolate", "extrapolate"),
              ("probe", "probe"))
    totals = {phase: sum(m.get(f"flops_{phase}", 0.0) for m in metrics) for _, phase in phases}
    totals["probe"] = sum(m.get("probe_flops", 0.0) for m in metrics)  # rollout.horizon=auto's probes
    total = sum(totals.values())
    if total <= 0:
        return None
    shares = ", ".join(f"{name} {100 * totals[phase] / total:.0f}%" for name, phase in phases
                       if phase not in ("extrapolate", "probe") or totals[phase] > 0)
    return f"{total:.1e} FLOPs ({shares})"
