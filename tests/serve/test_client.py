"""RemoteTeacher's failure handling against small real starlette apps that count their calls, and the CLI verb."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("requests")

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from esr.serve.client import RemoteTeacher, RemoteTeacherError  # noqa: E402
from esr.serve.server import BackgroundServer  # noqa: E402

OK_REPLY = {"logprobs": [[-1.5, -0.25]], "top_ids": [[]], "top_logprobs": [[]], "seconds": 0.0}


class Scripted:
    """An app whose /v1/score answers from a script of (status, body) and counts calls; async sleep if asked."""

    def __init__(self, script: list[tuple[int, dict]], sleep_s: float = 0.0) -> None:
        self.script, self.sleep_s, self.calls = script, sleep_s, 0

    async def score(self, request: Request) -> JSONResponse:
        await request.body()
        self.calls += 1
        if self.sleep_s:
            await asyncio.sleep(self.sleep_s)
        status, body = self.script[min(self.calls, len(self.script)) - 1]
        return JSONResponse(body, status_code=status)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/score", self.score, methods=["POST"])])


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: list[BackgroundServer] = []

    def start(script: list[tuple[int, dict]], sleep_s: float = 0.0) -> tuple[Scripted, str]:
        fake = Scripted(script, sleep_s)
        servers.append(BackgroundServer(fake.app()).start())
        return fake, servers[-1].url

    yield start
    for s in servers:
        s.stop()


def test_retries_503_then_succeeds(scripted):
    unavailable = {"error": {"message": "warming up", "code": 503}}
    fake, url = scripted([(503, unavailable), (503, unavailable), (200, OK_REPLY)])
    with RemoteTeacher(url, retries=4, backoff_s=0.01) as client:
        (scored,) = client.score([[1, 2, 3]], 1)
    assert fake.calls == 3
    assert scored.logprobs.tolist() == [-1.5, -0.25]
    assert scored.top_ids.shape == (2, 0)


def test_gives_up_after_retries_with_last_message(scripted):
    fake, url = scripted([(503, {"error": {"message": "overloaded"}})])
    with RemoteTeacher(url, retries=2, backoff_s=0.01) as client, pytest.raises(RemoteTeacherError) as err:
        client.score([[1, 2, 3]], 1)
    assert fake.calls == 3
    assert err.value.status == 503 and "gave up after 3 attempts" in str(err.value) and "overloaded" in str(err.value)


def test_retries_429(scripted):
    fake, url = scripted([(429, {"error": {"message": "slow down"}}), (200, OK_REPLY)])
    with RemoteTeacher(url, backoff_s=0.01) as client:
        client.score([[1, 2, 3]], 1)
    assert fake.calls == 2


def test_never_retries_400_and_shows_server_message(scripted):
    fake, url = scripted([(400, {"error": {"message": "start[0] = 0 is out of range"}}), (200, OK_REPLY)])
    with RemoteTeacher(url, retries=4, backoff_s=0.01) as client, pytest.raises(RemoteTeacherError) as err:
        client.score([[1, 2, 3]], 1)
    assert fake.calls == 1
    assert err.value.status == 400 and "start[0] = 0 is out of range" in str(err.value)


def test_timeout_raises_promptly_without_retry(scripted):
    fake, url = scripted([(200, OK_REPLY)], sleep_s=3.0)
    t0 = time.perf_counter()
    with RemoteTeacher(url, timeout_s=0.3, retries=4, backoff_s=0.01) as client, \
            pytest.raises(RemoteTeacherError, match="no answer within 0.3 s"):
        client.score([[1, 2, 3]], 1)
    assert time.perf_counter() - t0 < 2.0
    assert fake.calls == 1


def test_connection_refused_is_retried_then_raises():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with RemoteTeacher(f"http://127.0.0.1:{port}", retries=1, backoff_s=0.01) as client, \
            pytest.raises(RemoteTeacherError, match=r"gave up after 2 attempts in \d+ s; last: connection failed "
                                                    r"\(\[Errno \d+\] Connection refused\)$") as err:
        client.score([[1, 2, 3]], 1)
    assert err.value.status is None


def test_malformed_reply_length_is_an_error(scripted):
    _, url = scripted([(200, {**OK_REPLY, "logprobs": [[-1.0]]})])
    with RemoteTeacher(url) as client, pytest.raises(RemoteTeacherError, match="expected 2 log-probs"):
        client.score([[1, 2, 3]], 1)


def test_cli_parser_and_token_env(monkeypatch, capsys):
    from esr.cli_serve import add_serve_parser, run_serve

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["serve-teacher", "tiny-teacher"])
    assert (args.host, args.port, args.max_batch_tokens, args.dtype) == ("127.0.0.1", 8000, 8192, "float32")
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    args = parser.parse_args(["serve-teacher", "tiny-teacher", "--token-env", "NO_SUCH_TOKEN_VAR"])
    assert run_serve(args) == 2
    assert "NO_SUCH_TOKEN_VAR" in capsys.readouterr().err


def test_serve_warns_when_binding_beyond_loopback_without_token(monkeypatch, caplog, needs_smollm2_package):
    import esr.serve.server as server_module

    ran: dict[str, Any] = {}
    monkeypatch.setattr(server_module.uvicorn, "run", lambda app, **kw: ran.update(kw))
    with caplog.at_level(logging.WARNING, logger="esr.serve.server"):
        server_module.serve("tiny-teacher", host="0.0.0.0", port=9999)
    assert ran["host"] == "0.0.0.0" and ran["port"] == 9999
    assert any("without a token" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="esr.serve.server"):
        server_module.serve("tiny-teacher", host="0.0.0.0", port=9999, token="t")
        server_module.serve("tiny-teacher")
    assert not any("without a token" in r.getMessage() for r in caplog.records)
    assert server_module.is_loopback("127.0.0.1") and server_module.is_loopback("::1")
    assert not server_module.is_loopback("0.0.0.0") and not server_module.is_loopback("example.org")


@pytest.mark.slow
def test_cli_serves_end_to_end(needs_smollm2_package):
    """`python -m esr.cli_serve` (what `esr serve-teacher` runs) in its own process, token from the environment."""
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MY_TEACHER_TOKEN": "cli-token"}
    proc = subprocess.Popen([sys.executable, "-m", "esr.cli_serve", "tiny-teacher", "--port", str(port),
                             "--token-env", "MY_TEACHER_TOKEN", "--log-level", "warning"], env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        with RemoteTeacher(url, token="cli-token", retries=0) as client:
            while True:
                try:
                    assert client.health()["model"] == "tiny-teacher"
                    break
                except RemoteTeacherError:
                    assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
                    time.sleep(0.3)
            (scored,) = client.score([[1, 2, 3, 4]], 2, top_k=2)
            assert scored.logprobs.shape == (2,) and scored.top_ids.shape == (2, 2)
        with RemoteTeacher(url) as anonymous, pytest.raises(RemoteTeacherError) as err:
            anonymous.score([[1, 2, 3, 4]], 2)
        assert err.value.status == 401
    finally:
        proc.terminate()
        proc.wait(30)
