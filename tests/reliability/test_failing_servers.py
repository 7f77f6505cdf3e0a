"""Teacher servers that restart, die or answer errors in the middle of a real run (RELIABILITY.md, "Engines and servers
that fail").

Everything that fails is a real process: the teacher server is `esr serve-teacher tiny-teacher`, started as a child
and SIGKILLed (no cleanup, as a crash or an OOM kill) at a chosen moment, when the run's `metrics.jsonl` has step 1,
then started again at the same port; the run is an `esr train` child. A server that keeps answering 503 is a
fault-injecting proxy: a real HTTP server (``http.server`` in a thread of this process) in front of the real teacher
server, which forwards every request until the test tells it to answer ``503`` with a message. The resumes after a
failure run in this process (``esr.cli.main``; the child already proved the command line), against the same teacher
served from this process (``BackgroundServer``), as is the server behind the proxy.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from esr_process import assert_user_error, esr_cmd, esr_env, wait_until_healthy
from safetensors.torch import load_file

requests = pytest.importorskip("requests")
pytest.importorskip("uvicorn")

from esr.cli import main  # noqa: E402
from esr.config import load_config  # noqa: E402
from esr.train import train  # noqa: E402

SMOKE = "configs/smoke.yaml"
TOKEN = "failing-servers-token-5150"
STEPS = 4
RUN = ["loss.kind=sampled", f"train.steps={STEPS}", "train.checkpoint_every=2"]
VOLATILE = {"seconds_align", "seconds_generate", "seconds_score", "seconds_train", "peak_mem_gb"}
START_TIMEOUT_S = 180


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TeacherServer:
    """`esr serve-teacher tiny-teacher` in a child process (its own process group), at a fixed port."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> TeacherServer:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(esr_cmd("serve-teacher", "tiny-teacher", "--port", self.port,
                                                 "--log-level", "warning"),
                                         env=esr_env(ESR_TEACHER_TOKEN=TOKEN), stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if wait_until_healthy(self.proc, self.url, self.log, START_TIMEOUT_S, "the teacher server"):
            return self
        self.kill()
        pytest.fail(f"the teacher server did not come up in {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash would: no answer to the requests in flight, the port refuses connections."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def teacher_server(tmp_path_factory: pytest.TempPathFactory, needs_smollm2_package: None) -> Any:
    server = TeacherServer(_free_port(), tmp_path_factory.mktemp("teacher") / "server.log")
    try:
        yield server.start()
    finally:
        server.kill()


@pytest.fixture(scope="module")
def teacher_app(needs_smollm2_package: None) -> Any:
    """The same teacher server as an app for ``BackgroundServer`` (in this process: it starts in a second, where a
    child takes 10-20 s), for the servers that are not the fault under test."""
    from esr.models import load_model
    from esr.serve.server import build_app

    return build_app(*load_model("tiny-teacher"), token=TOKEN, model_name="tiny-teacher")


def _serve_in_process(app: Any, port: int = 0) -> Any:
    from esr.serve.server import BackgroundServer

    return BackgroundServer(app, port=port).start()


@pytest.fixture(autouse=True)
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESR_TEACHER_TOKEN", TOKEN)  # for the resumes and baselines in this process


def _start_run(url: str, run: Path, *overrides: str) -> subprocess.Popen[str]:
    return subprocess.Popen(esr_cmd("train", SMOKE, f"teacher.url={url}", *RUN, *overrides, "--out", run,
                                    "--no-progress"),
                            env=esr_env(ESR_TEACHER_TOKEN=TOKEN), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _logged_steps(run: Path) -> list[int]:
    """The steps in ``metrics.jsonl``; every line must be complete JSON."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    text = path.read_text()
    assert not text or text.endswith("\n"), f"a partial last line in {path}: {text[-200:]!r}"
    return [json.loads(line)["step"] for line in text.splitlines()]


def _wait_for_step(run: Path, proc: subprocess.Popen[str], step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        path = run / "metrics.jsonl"
        if path.exists() and any(f'"step": {step},' in line for line in path.read_text().splitlines()):
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before step {step}:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no step {step} in {timeout} s")


def _finish(proc: subprocess.Popen[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _failed_step(message: str) -> int:
    return int(message.removeprefix("esr: error: step ").split(":", 1)[0])


def _resume_in_process(run: Path) -> None:
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert _logged_steps(run) == list(range(1, STEPS + 1))
    assert (run / "checkpoints" / f"step-{STEPS:06d}").is_dir()


def test_a_teacher_server_that_restarts_mid_run_costs_the_run_nothing(teacher_server: TeacherServer,
                                                                     tmp_path: Path) -> None:
    """Killed when step 1 is logged, started again 2 s later at the same port: the client's default retries (10,
    about 150 s) wait for it and the run ends exactly where an uninterrupted one does."""
    if teacher_server.proc is None:  # the test that leaves it down ran first
        teacher_server.start()
    run = tmp_path / "run"
    proc = _start_run(teacher_server.url, run)  # teacher.retries at its default
    _wait_for_step(run, proc, 1)
    teacher_server.kill()
    down = time.monotonic()
    time.sleep(2.0)
    teacher_server.start()
    downtime = time.monotonic() - down
    done = _finish(proc)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    # the restart happened inside the run: a later step's scoring waited for the server (a few seconds of retries)
    waited = sum(m["seconds_score"] for m in metrics[1:])
    print(f"server down {downtime:.1f} s; steps 2-{STEPS} spent {waited:.1f} s scoring")
    assert waited > 2.0, (waited, downtime)

    whole = train(load_config(SMOKE, [f"teacher.url={teacher_server.url}", *RUN]), tmp_path / "whole",
                  progress=False)
    for got, want in zip(metrics, whole.metrics, strict=True):
        assert {k: v for k, v in got.items() if k not in VOLATILE} == \
            {k: v for k, v in want.items() if k not in VOLATILE}
    final = f"checkpoints/step-{STEPS:06d}/adapter_model.safetensors"
    got_w, want_w = load_file(run / final), load_file(tmp_path / "whole" / final)
    assert got_w.keys() == want_w.keys() and all(torch.equal(got_w[k], want_w[k]) for k in got_w)


def test_a_teacher_server_that_stays_down_stops_the_run_with_one_line(teacher_server: TeacherServer,
                                                                     teacher_app: Any, tmp_path: Path) -> None:
    """SIGKILLed when step 1 is logged and left down (the module's last use of the child server); the resume runs
    against the same teacher served from this process at the same port."""
    if teacher_server.proc is None:
        teacher_server.start()
    run = tmp_path / "run"
    proc = _start_run(teacher_server.url, run, "teacher.retries=2")
    _wait_for_step(run, proc, 1)
    teacher_server.kill()
    message = assert_user_error(_finish(proc), "teacher server (teacher.url)", f"{teacher_server.url}/v1/score",
                                "gave up after 3 attempts", "Connection refused", f"esr train --resume {run}")
    print(message)
    failed = _failed_step(message)
    assert _logged_steps(run) == list(range(1, failed)), message  # complete lines, each step once
    kept = "step-000002" if failed > 2 else "no checkpoint was written yet"
    assert kept in message, message
    back = _serve_in_process(teacher_app, teacher_server.port)
    try:
        _resume_in_process(run)
    finally:
        back.stop()


class FailingProxy:
    """A real HTTP server in front of ``target``: forwards every request (headers and body) until ``failing`` is
    set, then answers 503 with an esr-style JSON error, as a server whose model broke does."""

    MESSAGE = "the teacher model failed: CUDA error: an illegal memory access was encountered"

    def __init__(self, target: str) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                if proxy.failing:
                    proxy.refused += 1
                    data, status = json.dumps({"error": {"message": proxy.MESSAGE}}).encode(), 503
                else:
                    headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                    resp = requests.request(self.command, target + self.path, data=body or None, headers=headers,
                                            timeout=60)
                    data, status = resp.content, resp.status_code
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.failing, self.refused = False, 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_teacher_server_that_keeps_answering_503_stops_the_run_with_its_message(teacher_app: Any,
                                                                                 tmp_path: Path) -> None:
    server = _serve_in_process(teacher_app)
    proxy = FailingProxy(server.url)
    try:
        run = tmp_path / "run"
        proc = _start_run(proxy.url, run, "teacher.retries=2")
        _wait_for_step(run, proc, 1)
        proxy.failing = True
        message = assert_user_error(_finish(proc), "teacher server (teacher.url)", f"{proxy.url}/v1/score",
                                    "gave up after 3 attempts", f"HTTP 503: {FailingProxy.MESSAGE}",
                                    f"esr train --resume {run}")
        print(message)
        assert proxy.refused == 3  # the first try and two retries, then no more
        assert _logged_steps(run) == list(range(1, _failed_step(message))), message
        proxy.failing = False  # the server is healthy again
        _resume_in_process(run)
    finally:
        proxy.close()
        server.stop()
