"""Run the real ``esr`` command in a child process, as a user does, and check how it fails.

Every RELIABILITY.md row of a user-facing fault has a test through here: exit code 2, one message line naming the
cause, and no traceback (``assert_user_error``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def esr_env(**extra: str) -> dict[str, str]:
    """The child's environment: this one (``$ESR_CACHE`` included), with this checkout first on ``PYTHONPATH`` so
    the child imports the code under test wherever it runs."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def esr_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "esr", *map(str, args)]


def run_esr(*args: str | Path, timeout: float = 900, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``esr ARGS...`` to completion (progress bars off where the verb has them: pass ``--no-progress``)."""
    return subprocess.run(esr_cmd(*args), cwd=cwd or REPO, env=env or esr_env(), capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """A user error as the CLI must report it: exit code 2, no traceback, the last stderr line ``esr: error: ...``
    and that message on one line holding every needle. Returns the message."""
    err = proc.stderr
    assert proc.returncode == 2, f"exit code {proc.returncode}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("esr: error: "), err[-3000:]
    assert sum(line.startswith("esr: error: ") for line in lines) == 1, err[-3000:]
    message = lines[-1]
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def wait_until_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float, what: str) -> bool:
    """Poll ``url``/health until it answers 200 (True), the server process exits, or ``timeout`` seconds pass
    (False: the caller kills it and fails). An exit fails the test with the end of ``log``."""
    import pytest
    import requests  # here, not at the top: the modules without servers must not need it

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return False
