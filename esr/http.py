"""HTTP with retries, shared by esr's clients of other processes' servers (a teacher server, esr.serve.client; a
vLLM rollout server, esr.rollout.vllm_server): one policy, one way of reading a server's error.

``request`` sends one request and retries what a retry can fix: a connection error, a 5xx or a 429, ``retries``
times with exponential backoff and jitter (``backoff_s * 2**attempt``, capped at ``MAX_BACKOFF_S``, times a random
factor in [0.5, 1.5), at least the server's Retry-After). Any other 4xx is the caller's mistake and raises at once
with the server's message; so does a server that sends nothing for ``timeout_s`` (retrying would pile more work on a
server that is already behind). Errors are raised as ``error(message, status)`` (status None without an answer), so
each client raises its own ``EsrError`` subclass; a connection failure is named by its cause (``[Errno 111]
Connection refused``, the server closed the connection), not by urllib3's object reprs. This module imports nothing
from esr.

The budget: ``retries`` = 10 (the default of ``teacher.retries`` and ``rollout.vllm.retries``) with ``backoff_s``
0.5 waits 0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30 s, about 150 s in all (at least 75 s with the jitter): a server that
restarts in that time (a process restart and a model load) is ridden over without losing the step.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable
from typing import Any

import requests

MAX_BACKOFF_S = 30.0


def request(session: requests.Session, method: str, url: str, payload: Any = None, *,
            error: Callable[[str, int | None], Exception], headers: dict[str, str] | None = None,
            timeout_s: float = 60.0, retries: int = 4, backoff_s: float = 0.5, parse_json: bool = True) -> Any:
    """``method url`` with ``payload`` as JSON; the reply's JSON (its text when ``parse_json`` is False)."""
    data = json.dumps(payload, separators=(",", ":")).encode() if payload is not None else None
    headers = headers if headers is not None else {"Content-Type": "application/json"}
    failure, status, t0 = "", None, time.monotonic()
    for attempt in range(retries + 1):
        wait_at_least, status = 0.0, None
        try:
            resp = session.request(method, url, data=data, headers=headers,
                                   timeout=(min(10.0, timeout_s), timeout_s))
        except requests.ReadTimeout as err:
            raise error(f"{method} {url}: no answer within {timeout_s} s", None) from err
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
            failure = connection_failure(err)
        else:
            if resp.status_code < 400:
                if not parse_json:
                    return resp.text
                try:
                    return resp.json()
                except ValueError as err:
                    raise error(f"{method} {url}: the reply is not JSON", resp.status_code) from err
            message = error_message(resp)
            if resp.status_code < 500 and resp.status_code != 429:  # the caller's mistake: retrying won't help
                raise error(f"{method} {url}: HTTP {resp.status_code}: {message}", resp.status_code)
            failure, status = f"HTTP {resp.status_code}: {message}", resp.status_code
            wait_at_least = retry_after(resp)
        if attempt == retries:
            break
        delay = min(MAX_BACKOFF_S, backoff_s * 2**attempt) * random.uniform(0.5, 1.5)
        time.sleep(max(delay, wait_at_least))
    raise error(f"{method} {url}: gave up after {retries + 1} attempts in {time.monotonic() - t0:.0f} s; last: "
                f"{failure}", status)


def connection_failure(err: Exception) -> str:
    """What went wrong with a connection, in a few words: the OS error (``[Errno 111] Connection refused``), a
    server that closed the connection without answering, or the exception's class."""
    text = str(err)
    found = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if found:
        return f"connection failed ({found.group(0).strip()})"
    if "RemoteDisconnected" in text or "Connection aborted" in text or "ChunkedEncodingError" in type(err).__name__:
        return "the server closed the connection without a complete answer"
    return f"connection failed ({type(err).__name__}: {text[:200]})"


def error_message(resp: requests.Response) -> str:
    """The server's own message: esr's and vLLM's {"error": {"message"}}, older vLLM's {"message"}, else text."""
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason or ""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        for key in ("message", "detail", "error"):
            if key in body:
                return str(body[key])
    return str(body)[:500]


def retry_after(resp: requests.Response) -> float:
    """The server's Retry-After in seconds (at most 60), 0 without one."""
    value = resp.headers.get("Retry-After", "")
    try:
        return min(60.0, max(0.0, float(value)))
    except ValueError:
        return 0.0
