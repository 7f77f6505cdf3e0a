"""A real teacher server for the serve tests: `tiny-teacher` behind uvicorn on a free loopback port, with a token.

The server's packages (the `serve` extra) are imported inside the fixtures; each test module skips itself when they
are missing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

TOKEN = "test-token-1234"
MAX_BATCH_TOKENS = 128  # small, so that one request runs in several micro-batches
MAX_REQUEST_BYTES = 256 * 1024


@pytest.fixture(scope="session")
def token() -> str:
    return TOKEN


@pytest.fixture(scope="session")
def teacher(needs_smollm2_package: None) -> tuple[Any, Any]:
    from esr.models import load_model

    return load_model("tiny-teacher")


@pytest.fixture(scope="session")
def server(teacher: tuple[Any, Any]) -> Iterator[Any]:
    from esr.serve.server import BackgroundServer, build_app

    model, tokenizer = teacher
    app = build_app(model, tokenizer, token=TOKEN, max_batch_tokens=MAX_BATCH_TOKENS,
                    max_request_bytes=MAX_REQUEST_BYTES)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture
def client(server: Any) -> Iterator[Any]:
    from esr.serve.client import RemoteTeacher

    with RemoteTeacher(server.url, token=TOKEN, timeout_s=30) as remote:
        yield remote

