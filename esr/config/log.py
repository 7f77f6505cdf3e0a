"""The ``log`` section: where a run's metrics go besides ``metrics.jsonl`` (always written, the source of truth),
and the table of sample completions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from esr.config.ranges import at_least, ranged

Tracker = Literal["tensorboard", "wandb", "trackio", "mlflow"]


@dataclass(frozen=True)
class LogConfig:
    trackers: tuple[Tracker, ...] | None = None
    """Experiment trackers that get the config, every step's metrics, the evaluations and the samples table, through
    their own libraries (extras `esr-distill[wandb]`, `[trackio]`, `[mlflow]`, `[tensorboard]`; `[trackers]`: all):
    any of `tensorboard` (the run's tb/ folder), `wandb` (its files in the run's wandb/ folder; WANDB_MODE=offline
    keeps them local), `trackio` (its local store, TRACKIO_DIR), `mlflow` (MLFLOW_TRACKING_URI, else
    sqlite in the run's mlflow.db). Default (unset): TensorBoard when it is installed; `[]`: none."""
    samples_every: int = ranged(0, at_least(0))
    """Every this many steps, a table of sample completions of the step (prompt, response, its length in tokens,
    its mean KL per trained token, cut at the horizon) goes to samples.jsonl and every tracker (0: never)."""
    samples: int = ranged(4, at_least(1))
    """Rows of that table (the step's first rollouts)."""
    project: str | None = None
    """Tracker project (wandb/trackio project, mlflow experiment); default: the config's `name`."""
    run_name: str | None = None
    """Tracker run name; default: the run folder's name."""
