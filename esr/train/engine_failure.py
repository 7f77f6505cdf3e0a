"""What a run says when an engine or server fails mid-step: ``explain_engine_failure``.

A rollout or teacher engine that fails inside a step (a server that stays down or keeps answering 5xx after its
retries, an in-process vLLM engine that raises) raises an ``esr.errors.EngineError`` naming the engine and the cause.
The step it failed in wrote nothing: its metrics line is written only once the step is complete
(``esr.train.metrics``), and no checkpoint is started. So the error gets the step, the last intact checkpoint and the
command that continues the run; the CLI prints it as one line with exit code 2.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from esr.errors import EngineError
from esr.train.progress import RunProgress


@contextmanager
def explain_engine_failure(step: int, run_dir: Path, last_checkpoint: Path | None,
                           bar: RunProgress) -> Iterator[None]:
    """Re-raise an ``EngineError`` of step ``step`` (same class and status) with where the run stands and the
    ``esr train --resume`` command."""
    try:
        yield
    except EngineError as err:
        bar.close()
        kept = (f"the last checkpoint, {last_checkpoint.name}, is intact" if last_checkpoint is not None
                else "no checkpoint was written yet (a resume starts from step 1)")
        message = str(err).rstrip(". ")
        raise type(err)(f"step {step}: {message}. Nothing of step {step} was written and {kept}: once the cause is "
                        f"fixed, continue with `esr train --resume {run_dir}`", err.status) from err
