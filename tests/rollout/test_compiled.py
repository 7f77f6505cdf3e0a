"""``rollout.engine=hf-compiled`` (esr/rollout/compiled.py): a static KV cache (and on CUDA a compiled decode step)
under ``HFSampler``'s sampling, so the same seeds and row ids give the same tokens as ``hf``, with the same horizon
and EOS semantics; and a short training run through it."""

import dataclasses

import pytest
import torch

from esr.config import ConfigError, RolloutConfig, load_config
from esr.models import load_model
from esr.rollout import make_sampler
from esr.rollout.compiled import CompiledHFSampler, bucket, next_power_of_two
from esr.train import train

SMOKE = "configs/smoke.yaml"
QUESTIONS = ["What is 2 + 3?", "Name a prime number larger than ten, please.", "Hi", "Count to five, slowly."]


@pytest.fixture(scope="module")
def tiny(needs_smollm2_package):
    model, tok = load_model("tiny-student")
    return model, tok, [tok(q).input_ids for q in QUESTIONS]


def _pair(model, eos, pad, **kw):
    cfg = dataclasses.replace(RolloutConfig(), **kw)
    hf = make_sampler(cfg, model, eos_token_ids=eos, pad_token_id=pad)
    compiled = make_sampler(dataclasses.replace(cfg, engine="hf-compiled"), model, eos_token_ids=eos, pad_token_id=pad)
    assert type(compiled) is CompiledHFSampler and compiled.model is model and compiled.copy is None
    return hf, compiled


def _responses(r):
    return [r.response_ids_B_R[b, : int(r.lengths_B[b])].tolist() for b in range(len(r))]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_compiled_samples_what_hf_samples(tiny, temperature):
    model, tok, prompts = tiny
    hf, compiled = _pair(model, [tok.eos_token_id], tok.pad_token_id, temperature=temperature, top_p=0.95)
    assert compiled.generation_config(10, 64).cache_implementation == "static"
    ref = _responses(hf.sample(prompts, 10, seed=5))
    assert _responses(compiled.sample(prompts, 10, seed=5)) == ref
    # three rows (padded to four with copies of the first), other positions and ids: each row's own sample
    order = [3, 1, 0]
    moved = compiled.sample([prompts[b] for b in order], 10, seed=5, row_ids=order)
    assert _responses(moved) == [ref[b] for b in order]


def test_compiled_keeps_horizon_and_first_eos(tiny):
    """EOS is declared as a token the student emits mid-response, so rows end there: the response keeps that first
    EOS, nothing after it, and a row without one is cut at the horizon."""
    model, tok, prompts = tiny
    hf, _ = _pair(model, [tok.eos_token_id], tok.pad_token_id)
    free = _responses(hf.sample(prompts, 12, seed=2))
    eos = free[0][4]
    hf, compiled = _pair(model, [eos], tok.pad_token_id, batch_size=3)  # chunks of 3 rows: the last one padded
    r = compiled.sample(prompts, 12, seed=2)
    assert _responses(r) == _responses(hf.sample(prompts, 12, seed=2))
    for b, resp in enumerate(_responses(r)):
        assert 1 <= len(resp) <= 12
        if eos in free[b]:
            assert resp == free[b][: free[b].index(eos) + 1] and not r.cut_B[b]
        else:
            assert resp == free[b] and len(resp) == 12 and r.cut_B[b]
    assert len(_responses(r)[0]) == 5


def test_buckets():
    assert [bucket(n, 64) for n in (1, 64, 65)] == [64, 64, 128]
    assert [next_power_of_two(n) for n in (1, 2, 3, 16, 17)] == [1, 2, 4, 16, 32]


def test_two_training_steps_with_hf_compiled(tmp_path, needs_smollm2_package):
    result = train(load_config(SMOKE, ["train.steps=2", "rollout.engine=hf-compiled", "rollout.dtype=bfloat16"]),
                   tmp_path / "run", progress=False)
    assert [m["step"] for m in result.metrics] == [1, 2]
    for m in result.metrics:
        assert m["kl"] > 0 and torch.isfinite(torch.tensor(m["loss"])) and 1 <= m["response_len_max"] <= 16


@pytest.mark.parametrize("override", ["rollout.engine=hf-compiled", "rollout.dtype=bfloat16"])
def test_fsdp_refuses_a_compiled_engine_or_a_sampling_copy(override):
    with pytest.raises(ConfigError, match="train.fsdp samples with the sharded student itself"):
        load_config(SMOKE, ["train.fsdp=true", override])
