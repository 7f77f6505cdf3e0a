"""The base of every error a user can cause and fix: ``EsrError``.

Each error class subclasses it where it is raised (``ConfigError`` in ``esr.config``, ``DataError`` in ``esr.data``,
``CheckpointError`` in ``esr.train.checkpoint``, ...), often beside the builtin it refines (``ValueError``,
``RuntimeError``), so ``except ValueError`` keeps working. The CLI catches ``EsrError`` and prints its message as one
line instead of a traceback. This module imports nothing from esr, so any layer can raise a subclass.
"""


class EsrError(Exception):
    """An error whose message tells the user what to change (a config value, a path, a package, a run folder)."""


class EngineError(EsrError, RuntimeError):
    """A rollout or teacher engine, or the server one talks to, failed (after the retries that can help): the
    message names the engine and the cause. ``status`` is the HTTP status when a server answered, else None. The
    training loop adds the step, the last intact checkpoint and the resume command (``esr.train.engine_failure``)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
