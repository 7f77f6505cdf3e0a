"""The teacher client's error, importable without the HTTP packages (the training side raises and catches it)."""

from esr.errors import EsrError


class RemoteTeacherError(EsrError, RuntimeError):
    """The teacher server refused a request, failed, or could not be reached; ``status`` is the HTTP status
    (None when there was no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
