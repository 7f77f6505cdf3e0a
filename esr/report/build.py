"""``write_report``: read run folders, build the report once, write it as HTML and as markdown."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from esr.report.analysis import discover_paths
from esr.report.collect import load_runs
from esr.report.html import render_html
from esr.report.markdown import render_markdown
from esr.report.sections import build_document


def output_paths(out: Path | None, first_run: Path) -> tuple[Path, Path]:
    """(html, md): ``out`` (``report.md`` given means ``report.html`` beside it), default in the first run folder."""
    html = Path(out) if out is not None else first_run / "report.html"
    if html.suffix == ".md":
        html = html.with_suffix(".html")
    elif html.suffix != ".html":
        html = html.with_name(html.name + ".html")
    return html, html.with_suffix(".md")


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(run_dirs: Sequence[Path | str], out: Path | str | None = None, *, title: str | None = None,
                 analyses: Sequence[Path | str] = ()) -> tuple[Path, Path]:
    """Compare the runs in ``run_dirs`` in one self-contained HTML file and its markdown twin; return both paths.

    ``out`` is the HTML file (default ``run_dirs[0]/report.html``); the markdown goes beside it with the same stem
    and its PNGs into ``<stem>_files/``. ``analyses`` adds analysis outputs kept outside the run folders (JSON or
    PNG files, or folders of them); those inside a run folder are found on their own. A missing run folder, or one
    without metrics.jsonl, raises ReportError naming it; a torn last line of metrics.jsonl is skipped and noted.
    """
    runs = load_runs([Path(p) for p in run_dirs])
    html_path, md_path = output_paths(Path(out) if out is not None else None, runs[0].path)
    doc = build_document(runs, discover_paths([Path(p) for p in analyses]), title=title)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(html_path, render_html(doc))
    _write_text(md_path, render_markdown(doc, md_path))
    return html_path, md_path
