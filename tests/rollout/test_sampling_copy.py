"""``rollout.dtype`` with the ``hf`` engine (esr/rollout/sampling_copy.py): a copy in another dtype that follows the
trained weights step after step (LoRA merged without touching the trained module; full fine-tuning cast), and
``auto`` sampling with the trainer's module itself."""

import dataclasses

import pytest
import torch

from esr.config import RolloutConfig, load_config
from esr.models import apply_lora, load_model
from esr.rollout import HFSampler, make_sampler
from esr.rollout.engine import EngineContext
from esr.train.session import build_session

SMOKE = "configs/smoke.yaml"
BF16 = dataclasses.replace(RolloutConfig(), dtype="bfloat16")


@pytest.fixture
def tiny(needs_smollm2_package):
    model, tok = load_model("tiny-student")
    ids = torch.tensor([tok("What is 2 + 3? Name a prime number.").input_ids])
    return model, tok, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _sampler(cfg, model, tok, finetune="lora"):
    ctx = EngineContext(source="unused", finetune=finetune, lora_rank=8, train_dtype=torch.float32, max_model_len=64)
    return make_sampler(cfg, model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, context=ctx)


def _close(copy_logits, ref_logits):
    """Within bf16 rounding: the copy's logits differ from the fp32 model's by a small fraction of their spread."""
    return float((copy_logits - ref_logits).abs().max()) < 0.05 * float(ref_logits.std()) + 0.02


def test_auto_samples_with_the_trained_module_itself(tiny):
    model, tok, _ = tiny
    sampler = _sampler(RolloutConfig(), model, tok)
    assert type(sampler) is HFSampler and sampler.model is model and sampler.copy is None
    same = _sampler(dataclasses.replace(RolloutConfig(), dtype="float32"), model, tok)  # = the trainer's dtype
    assert same.model is model and same.copy is None


def test_lora_copy_follows_the_adapters_without_touching_the_trained_module(tiny):
    model, tok, ids = tiny
    peft_model = apply_lora(model, r=8, alpha=16, dropout=0.0, targets="all-linear")
    base_q = peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    sampler = _sampler(BF16, peft_model, tok)
    copy = sampler.model
    assert copy is not peft_model and {p.dtype for p in copy.parameters()} == {torch.bfloat16}
    assert not any("lora" in n for n, _ in copy.named_parameters())  # plain layers holding merged weights
    assert _close(_logits(copy, ids), _logits(peft_model, ids))
    # A training step moves the adapters (B starts at 0): the copy is stale until sync_weights, then follows.
    opt = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    moved = _logits(peft_model, ids)
    assert not _close(_logits(copy, ids), moved)
    sampler.sync_weights(peft_model)
    assert _close(_logits(copy, ids), moved)
    after = peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert torch.equal(after, base_q)  # the merge never wrote into the trained module
    rollouts = sampler.sample([ids[0].tolist()], 6, seed=3)
    assert int(rollouts.lengths_B[0]) <= 6


def test_full_finetune_copy_is_a_cast_of_every_weight(tiny):
    model, tok, ids = tiny
    sampler = _sampler(BF16, model, tok, finetune="full")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    moved = _logits(model, ids)
    assert not _close(_logits(sampler.model, ids), moved)
    sampler.sync_weights(model)
    assert _close(_logits(sampler.model, ids), moved)
    emb = sampler.model.get_input_embeddings().weight
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, model.get_input_embeddings().weight.to(torch.bfloat16))


def test_session_builds_the_copy_only_when_rollout_dtype_asks(needs_smollm2_package):
    s = build_session(load_config(SMOKE, ["rollout.dtype=bfloat16"]))
    assert s.info["dtype"] == "float32" and s.sampler.copy is not None and s.sampler.model is not s.student
    assert next(s.sampler.model.parameters()).dtype == torch.bfloat16
    assert s.sampler.sample([s.prompt_ids[0]], 4, seed=1).response_ids_B_R.shape[0] == 1
