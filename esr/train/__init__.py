"""Training: the loop, one step's loss, checkpoints and metrics."""

from esr.train.loop import NonFiniteLossError, RunFolderError, RunResult, StepOutOfMemoryError, resume, train

__all__ = ["NonFiniteLossError", "RunFolderError", "RunResult", "StepOutOfMemoryError", "resume", "train"]
