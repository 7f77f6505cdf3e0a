"""Run reports: compare run folders in one self-contained HTML page and a markdown twin.

    from esr.report import write_report
    html, md = write_report([Path("runs/esr-a"), Path("runs/full-b")])   ==   esr report runs/esr-a runs/full-b
"""

from esr.report.build import write_report
from esr.report.collect import ReportError, RunData, load_run, load_runs

__all__ = ["ReportError", "RunData", "load_run", "load_runs", "write_report"]
