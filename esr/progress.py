"""Progress bars: one builder for every long loop in esr (training, evaluation, probes, preparing a zoo preset).

A bar counts items (``n/total``, elapsed, eta) or, with ``byte_counts``, bytes copied and hashed (a spinner, the byte
count when the task has a ``bytes`` field, elapsed). ``stats`` adds the task's ``stats`` field after the eta (the
training loop's loss and KL). A disabled bar prints nothing.

    with progress_bar(enabled=True) as bar:
        task = bar.add_task("kl-profile: sample + score", total=n)
        bar.update(task, advance=1)
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _BytesColumn(DownloadColumn):
    """Byte counts only for tasks with a true ``bytes`` field (a conversion step has no byte size to show)."""

    def render(self, task: Task) -> Text:
        return super().render(task) if task.fields.get("bytes") else Text("")


def progress_bar(enabled: bool = True, *, byte_counts: bool = False, stats: bool = False,
                 console: Console | None = None) -> Progress:
    """A rich ``Progress`` in esr's one style (module docstring); ``console``: where it draws (rich's default:
    stdout)."""
    columns: list[ProgressColumn | str]
    if byte_counts:
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), _BytesColumn(), TimeElapsedColumn()]
    else:
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn()]
    if stats:
        columns.append(TextColumn("{task.fields[stats]}"))
    return Progress(*columns, console=console, disable=not enabled, transient=False)
