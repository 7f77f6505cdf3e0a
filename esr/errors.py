"""The errors a user can cause and fix; the CLI prints these as one clear line instead of a traceback."""

from esr.analysis.rollout_scores import AnalysisError
from esr.config import ConfigError
from esr.data import DataError
from esr.models.load import ModelSpecError
from esr.models.zoo import ZooChecksumError, ZooPackageMissing
from esr.report import ReportError
from esr.serve.errors import RemoteTeacherError
from esr.train.checkpoint import CheckpointError
from esr.train.loop import NonFiniteLossError, RunFolderError, StepOutOfMemoryError

USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, DataError, ModelSpecError, ZooPackageMissing, ZooChecksumError, CheckpointError, NonFiniteLossError,
    RunFolderError, ReportError, AnalysisError, FileNotFoundError, StepOutOfMemoryError,
    RemoteTeacherError,
)
