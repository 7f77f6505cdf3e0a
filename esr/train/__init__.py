"""Training: the loop, one step's loss, checkpoints and metrics."""

from esr.train.extend import EXTENDABLE, RunExtensionError
from esr.train.loop import NonFiniteLossError, RunFolderError, RunResult, StepOutOfMemoryError, resume, train
from esr.train.stopping import RunStopped

__all__ = ["EXTENDABLE", "NonFiniteLossError", "RunExtensionError", "RunFolderError", "RunResult", "RunStopped",
           "StepOutOfMemoryError", "resume", "train"]
