"""The teacher as a service: `esr serve-teacher` (server) and `RemoteTeacher` (client).

- ``server``: ``build_app(model, tokenizer, ...)`` (a starlette app), ``serve(spec, host, port, token, ...)`` and
  ``BackgroundServer`` (uvicorn in a thread); endpoints /health, /v1/score, /v1/completions (vLLM's prompt_logprobs).
- ``client``: ``RemoteTeacher(url, dialect="esr" | "openai")`` with ``score``, ``score_rollouts`` and ``health``.
- ``protocol``: request validation and response shapes; ``scoring``: the model computation (no HTTP);
  ``vocab``: the tokenizer digest /health publishes (a trainer checks it against its student's).

The server needs the ``serve`` extra (``pip install "esr-distill[serve]"``: starlette, uvicorn, requests); the client
needs requests only. Names are imported lazily so that ``import esr.serve`` never requires the server's packages.
"""

from __future__ import annotations

import importlib
from typing import Any

DEFAULT_TOKEN_ENV = "ESR_TEACHER_TOKEN"
"""The environment variable holding the bearer token, read by `esr serve-teacher` and by a trainer whose config sets
no ``teacher.token_env`` (never a command-line argument, which other users could read in the process list)."""

_EXPORTS = {
    "RemoteTeacher": "esr.serve.client",
    "RemoteTeacherError": "esr.serve.errors",
    "RolloutScores": "esr.serve.client",
    "ScoredSequence": "esr.serve.client",
    "BackgroundServer": "esr.serve.server",
    "build_app": "esr.serve.server",
    "serve": "esr.serve.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'esr.serve' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
