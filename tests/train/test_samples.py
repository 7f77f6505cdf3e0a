"""rollout.samples_per_prompt (k samples of each prompt) and rollout.teacher_share (teacher-sampled rows) on the tiny
smoke models: which rows and prompts a step samples, what the teacher samples, resume, refused setups, metrics."""

import dataclasses

import pytest
import torch
from crash_resume import crash_and_resume, same_adapter

from esr.config import ConfigError, LossConfig, load_config
from esr.data.order import batch_indices, step_prompts
from esr.rollout.mixed import merge_rollouts, sample_mixed, teacher_rows
from esr.rollout.sampler import HFSampler
from esr.train import train
from esr.train.run_step import _sample, run_step
from esr.train.samples import make_teacher_sampler, teacher_rows_seed
from esr.train.session import build_session
from esr.train.step import EngineHealth

SMOKE = "configs/smoke.yaml"
VOLATILE = {"seconds_align", "seconds_generate", "seconds_score", "seconds_train", "peak_mem_gb"}


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


@pytest.fixture(scope="module")
def k4():
    """A session whose steps hold one prompt sampled 4 times (train.batch_size=4, k=4)."""
    cfg = load_config(SMOKE, ["rollout.samples_per_prompt=4"])
    return cfg, build_session(cfg)


@pytest.fixture(scope="module")
def all_teacher():
    cfg = load_config(SMOKE, ["rollout.teacher_share=1"])
    return cfg, build_session(cfg)


def test_step_prompts_repeat_the_steps_prompts_k_times():
    assert step_prompts(32, 4, 5, 0) == list(batch_indices(32, 4, 5, 0))  # k = 1: the order of old runs
    drawn = list(batch_indices(32, 2, 3, 7))
    assert step_prompts(32, 4, 3, 7, samples_per_prompt=2) == [drawn[0], drawn[0], drawn[1], drawn[1]]


def test_k_samples_of_a_prompt_differ_and_are_reproducible(k4):
    cfg, s = k4
    horizon = s.policy.plan(0)
    rows, prompt_index, rollouts, _, from_teacher = _sample(s, cfg, 0, horizon)
    assert len(set(prompt_index)) == 1 and len(prompt_index) == 4 and not any(from_teacher)
    responses = [tuple(rollouts.response_ids_B_R[b][rollouts.response_mask_B_R[b]].tolist()) for b in range(4)]
    assert len(set(responses)) == 4, "the 4 samples of one prompt must differ (each row has its own seed)"
    again = _sample(s, cfg, 0, horizon)[2]
    assert torch.equal(again.input_ids_B_L, rollouts.input_ids_B_L)
    # A process holding rows 2-3 of the batch (esr.train.distributed.my_rows) samples what the whole batch has there.
    pad_to = rollouts.prompt_len
    half = s.sampler.sample([s.prompt_ids[prompt_index[b]] for b in (2, 3)], horizon, seed=cfg.seed * 1_000_003,
                            row_ids=[2, 3], pad_to=pad_to)
    assert torch.equal(half.input_ids_B_L, rollouts.input_ids_B_L[2:4, : half.input_ids_B_L.shape[1]])


def test_distinct_share_is_logged_with_k_samples(k4):
    cfg, s = k4
    m = run_step(s, cfg, 1)
    assert m.distinct_share == 1.0 and m.teacher_sampled == 0 and m.kl_teacher_sampled is None


def test_teacher_share_one_trains_on_what_the_teacher_samples(all_teacher):
    cfg, s = all_teacher
    horizon = s.policy.plan(0)
    rows, prompt_index, rollouts, _, from_teacher = _sample(s, cfg, 0, horizon)
    assert all(from_teacher) and len(rows) == 4
    prompts, seed = [s.prompt_ids[i] for i in prompt_index], cfg.seed * 1_000_003
    kw = dict(eos_token_ids=s.info["eos_token_ids"], pad_token_id=s.tokenizer.pad_token_id,
              temperature=cfg.rollout.temperature)
    pad_to = rollouts.prompt_len
    by_teacher = HFSampler(s.teacher, **kw).sample(prompts, horizon, seed=seed, row_ids=list(rows), pad_to=pad_to)
    by_student = HFSampler(s.student, **kw).sample(prompts, horizon, seed=seed, row_ids=list(rows), pad_to=pad_to)
    assert torch.equal(rollouts.input_ids_B_L, by_teacher.input_ids_B_L)
    assert not torch.equal(by_student.input_ids_B_L, by_teacher.input_ids_B_L)
    m = run_step(s, cfg, 0)
    assert m.teacher_sampled == 4 and m.tokens_teacher_sampled == m.tokens_scored
    assert m.kl_teacher_sampled == pytest.approx(m.kl, rel=1e-5)


def test_teacher_rows_are_a_seeded_share():
    assert teacher_rows(8, 0.0, 1) == [False] * 8 and teacher_rows(8, 1.0, 1) == [True] * 8
    picked = teacher_rows(4000, 0.25, 3)
    assert picked == teacher_rows(4000, 0.25, 3) and picked != teacher_rows(4000, 0.25, 4)
    assert abs(sum(picked) / 4000 - 0.25) < 0.03


def test_mixed_batch_keeps_each_rows_sample_and_skips_teacher_rows_in_engine_health(all_teacher):
    cfg, s = all_teacher
    prompts = [s.prompt_ids[i] for i in range(4)]
    kw = dict(seed=11, pad_to=max(map(len, prompts)))
    student = s.sampler.sample(prompts, 8, row_ids=[0, 1, 2, 3], **kw)
    teacher = s.teacher_sampler.sample(prompts, 8, row_ids=[0, 1, 2, 3], **kw)
    mixed = sample_mixed(s.sampler, s.teacher_sampler, prompts, [False, True, True, False], 8, row_ids=[0, 1, 2, 3],
                         pad_token_id=s.tokenizer.pad_token_id, **kw)
    for b, source in enumerate([student, teacher, teacher, student]):
        n = int(source.lengths_B[b])
        assert torch.equal(mixed.response_ids_B_R[b, :n], source.response_ids_B_R[b, :n])
        assert torch.equal(mixed.response_mask_B_R[b], torch.arange(mixed.response_mask_B_R.shape[1]) < n)
    # An engine with log-probs (vLLM): the merged teacher rows get NaN, which EngineHealth leaves out.
    with_logp = dataclasses.replace(student, logprobs_B_R=torch.zeros(student.response_mask_B_R.shape))
    merged = merge_rollouts([([0], with_logp.slice(0, 1)), ([3], with_logp.slice(3, 4)),
                             ([1, 2], teacher.slice(1, 3))], s.tokenizer.pad_token_id,
                            engine_logprobs=[True, True, False])
    assert merged.logprobs_B_R[1:3].isnan().all() and not merged.logprobs_B_R[[0, 3]].isnan().any()
    health = EngineHealth(merged, torch.device("cpu"))
    logits_B_R_V = torch.randn((*merged.response_mask_B_R.shape, 64))
    tokens_B_R = merged.response_ids_B_R.clamp(max=63)
    R = merged.response_mask_B_R.shape[1]
    values = health.update(logits_B_R_V, tokens_B_R, 0, R, torch.ones(tokens_B_R.shape),
                           LossConfig(kind="sampled", tis_cap=2.0))
    assert health.tokens == int(merged.lengths_B[[0, 3]].sum())
    assert torch.equal(values[1:3], torch.ones_like(values[1:3])) and not values.isnan().any()


def test_resume_with_k_samples_and_teacher_rows_is_bit_exact(tmp_path, monkeypatch):
    overrides = ["train.steps=3", "train.checkpoint_every=2", "rollout.samples_per_prompt=2",
                 "rollout.teacher_share=0.5"]
    whole = train(load_config(SMOKE, overrides), tmp_path / "whole", progress=False)
    assert 0 < sum(r["teacher_sampled"] for r in whole.metrics) < 12
    assert all(r["distinct_share"] is not None for r in whole.metrics)

    resumed = crash_and_resume(monkeypatch, load_config(SMOKE, overrides), tmp_path / "crashed")  # inside step 3
    assert _stable(resumed.metrics) == _stable(whole.metrics)
    assert same_adapter(whole, resumed)


@pytest.mark.parametrize(("overrides", "needles"), [
    (["rollout.samples_per_prompt=3"], ["rollout.samples_per_prompt=3", "train.batch_size=4"]),
    (["rollout.teacher_share=0.5", "teacher.url=http://127.0.0.1:9", "loss.kind=sampled"],
     ["rollout.teacher_share=0.5", "teacher.url", "teacher.engine=hf"]),
    (["rollout.teacher_share=0.5", "teacher.engine=vllm", "loss.kind=sampled"],
     ["rollout.teacher_share=0.5", "teacher.engine=vllm"]),
    (["rollout.teacher_share=1.5"], ["rollout.teacher_share"]),
])
def test_refused_settings_are_config_errors(overrides, needles):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides)
    assert "\n" not in str(err.value)
    for needle in needles:
        assert needle in str(err.value)


def test_teacher_share_across_tokenizers_is_a_one_line_config_error(k4):
    """build_session refuses it right after comparing the vocabularies (before the prompts are read); the CLI prints
    any ConfigError as one line (tests/train/test_loop.py)."""
    _, s = k4
    cfg = load_config(SMOKE, ["teacher.name=tiny-teacher-qwen", "loss.cross_tokenizer=aligned-exact",
                              "rollout.teacher_share=0.25"])
    with pytest.raises(ConfigError) as err:
        make_teacher_sampler(cfg, s.teacher, "aligned-exact", eos_token_ids=[0], pad_token_id=0, vocab_size=8)
    message = str(err.value)
    assert "\n" not in message and "rollout.teacher_share=0.25" in message and "tokenizer" in message
    assert make_teacher_sampler(load_config(SMOKE), s.teacher, None, eos_token_ids=[0], pad_token_id=0,
                                vocab_size=8) is None


def test_teacher_rows_on_a_vllm_student_engine_are_left_out_of_its_health_and_tis():
    """A vLLM engine's log-probs cover the student's rows only: with the teacher's rows counted, delta would be
    NaN (their log-probs) or log p_trainer itself (if they were 0), far above the fp32 engine's ~1e-6."""
    pytest.importorskip("vllm", reason="the vllm extra is not installed: pip install 'esr-distill[vllm]'")
    cfg = load_config(SMOKE, ["student.name=tiny-qwen", "teacher.name=tiny-teacher-qwen", "rollout.engine=vllm",
                              "rollout.vllm.kv_cache_gib=1", "data.max_prompt_tokens=200",
                              "rollout.vllm.max_model_len=256", "rollout.teacher_share=0.5", "loss.kind=sampled",
                              "loss.tis_cap=2.0"])
    s = build_session(cfg)
    try:
        metrics = [run_step(s, cfg, step) for step in range(2)]
    finally:
        s.sampler.close()
    assert [m.teacher_sampled for m in metrics] == [sum(teacher_rows(4, 0.5, teacher_rows_seed(cfg, k)))
                                                    for k in range(2)]
    assert 0 < sum(m.teacher_sampled for m in metrics) < 8
    for m in metrics:
        assert m.engine_logp_delta_mean is not None and m.engine_logp_delta_mean < 1e-3
        assert m.loss == m.loss and m.kl_teacher_sampled is not None
