"""`esr check RUN`: the state of a run folder's checkpoints and metrics file, and what `esr train --resume` would do
with them (``esr.train.run_check``). Reads only; exit code 0 when everything is intact, 1 when something is damaged
(a resume would fall back, start over or stop), 2 when RUN is not a run folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_check_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `check` verb to an argparse subparsers object."""
    p = subparsers.add_parser("check", help="verify a run folder's checkpoints and metrics file; change nothing",
                              epilog="exit code 0: all intact; 1: damaged (a resume would fall back); 2: not a run "
                                     "folder")
    p.add_argument("run", type=Path, help="run folder")
    return p


def run_check(args: argparse.Namespace) -> int:
    from esr.train.run_check import check_run

    result = check_run(args.run)
    print(f"run folder: {args.run}\n{result.report()}")
    return result.exit_code
