"""The teacher client's error, importable without the HTTP packages (the training side raises and catches it)."""

from esr.errors import EngineError


class RemoteTeacherError(EngineError):
    """The teacher server refused a request, failed, or could not be reached; ``status`` is the HTTP status
    (None when there was no answer)."""
