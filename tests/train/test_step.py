"""The chunked, micro-batched loss equals the plain full-logits computation, in value and in gradient."""

import pytest
import torch

from esr.config import LossConfig
from esr.losses import DIVERGENCES, jsd, masked_mean, token_logprobs
from esr.models import load_model
from esr.rollout.sampler import HFSampler
from esr.teacher.score import LocalScorer
from esr.teacher.targets import ExactTargets
from esr.train.step import distill_micro_batch


@pytest.fixture(scope="module")
def pair():
    student, tok = load_model("tiny-student")
    teacher, _ = load_model("tiny-teacher")
    for p in student.parameters():
        p.requires_grad_(True)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in
               ["What is 2 + 3?", "Name a colour.", "Count: one two", "x"]]
    eos = [tok.eos_token_id]
    sampler = HFSampler(student, eos_token_ids=eos, pad_token_id=tok.pad_token_id, temperature=1.0)
    rollouts = sampler.sample(prompts, 12, seed=3)
    return student, teacher, rollouts


def reference_loss(student, teacher, rollouts, kind, beta=0.5):
    """Plain computation: full logits of both models, loss per position, token mean over the response mask."""
    kw = dict(attention_mask=rollouts.attention_mask_B_L, position_ids=rollouts.position_ids_B_L)
    P = rollouts.prompt_len
    s = student(rollouts.input_ids_B_L, **kw).logits[:, P - 1 : -1].float()
    with torch.no_grad():
        t = teacher(rollouts.input_ids_B_L, **kw).logits[:, P - 1 : -1].float()
    mask = rollouts.response_mask_B_R
    if kind == "sampled":
        tokens = rollouts.response_ids_B_R
        ls, lt = token_logprobs(s, tokens), token_logprobs(t, tokens)
        values = -(lt - ls).detach() * ls
    elif kind == "jsd":
        values = jsd(s, t, beta)
    else:
        values = DIVERGENCES[kind](s, t)
    return masked_mean(values, mask)


def local(scorer, rollouts):
    """The local teacher's targets for ``rollouts`` as one micro-batch (its hidden states of these very rows)."""
    return ExactTargets(hidden_B_R_H=scorer.score(rollouts), head=scorer.logits)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd", "sampled"])
def test_chunked_loss_and_grad_match_full_logits(pair, kind):
    student, teacher, rollouts = pair
    assert rollouts.response_mask_B_R.sum() > 8  # something to train on
    student.zero_grad()
    ref = reference_loss(student, teacher, rollouts, kind)
    ref.backward()
    ref_grads = grads(student)
    student.zero_grad()
    n_total = int(rollouts.response_mask_B_R.sum())
    scorer = LocalScorer(teacher, vocab_size=student.config.vocab_size)
    out = distill_micro_batch(student, local(scorer, rollouts), rollouts, rollouts.response_mask_B_R, n_total,
                              LossConfig(kind=kind, chunk_size=5), student.config.vocab_size)
    assert out.loss == pytest.approx(float(ref.detach()), rel=1e-5, abs=1e-6)
    got = grads(student)
    assert got.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(got[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_loss_does_not_depend_on_micro_batch_split(pair):
    student, teacher, rollouts = pair
    scorer = LocalScorer(teacher, vocab_size=student.config.vocab_size)
    cfg = LossConfig(chunk_size=4)
    n_total = int(rollouts.response_mask_B_R.sum())
    results = []
    for split in ([0, 4], [0, 1, 4], [0, 3, 4], [0, 2, 4]):
        student.zero_grad()
        loss = 0.0
        for a, b in zip(split[:-1], split[1:], strict=True):
            mb = rollouts.slice(a, b)
            sel = rollouts.response_mask_B_R[a:b, : mb.response_mask_B_R.shape[1]]
            loss += distill_micro_batch(student, local(scorer, mb), mb, sel, n_total, cfg,
                                        student.config.vocab_size).loss
        results.append((loss, grads(student)))
    for loss, g in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        for name in g:
            torch.testing.assert_close(g[name], results[0][1][name], rtol=1e-4, atol=1e-6)


def test_empty_selection_gives_zero_loss_and_zero_grad(pair):
    student, teacher, rollouts = pair
    student.zero_grad()
    scorer = LocalScorer(teacher, vocab_size=student.config.vocab_size)
    none = torch.zeros_like(rollouts.response_mask_B_R)
    out = distill_micro_batch(student, local(scorer, rollouts), rollouts, none, 1, LossConfig(),
                              student.config.vocab_size)
    assert out.loss == 0.0 and out.kl_sum == 0.0
    assert all(float(g.abs().sum()) == 0.0 for g in grads(student).values())


def test_engine_logprobs_give_the_health_metric_and_truncated_importance_weights(pair):
    """An engine whose log-probs sit log 3 below the trainer's on even positions and equal it on odd ones: the
    health metric is their mean/max gap, and loss.tis_cap=2 weights the sampled loss by min(ratio, 2), i.e. the
    even positions' loss doubles, the odd ones' stays."""
    import dataclasses

    student, teacher, rollouts = pair
    scorer = LocalScorer(teacher, vocab_size=student.config.vocab_size)
    trainer_logp = reference_trainer_logprobs(student, rollouts)
    even = (torch.arange(rollouts.response_mask_B_R.shape[1]) % 2 == 0).expand_as(trainer_logp)
    gap = torch.where(even, torch.log(torch.tensor(3.0)), 0.0)
    engine = dataclasses.replace(rollouts, logprobs_B_R=torch.where(rollouts.response_mask_B_R,
                                                                    trainer_logp - gap, 0.0))
    mask, n = rollouts.response_mask_B_R, float(rollouts.response_mask_B_R.sum())
    cfg = LossConfig(kind="sampled", chunk_size=5)
    plain = distill_micro_batch(student, local(scorer, rollouts), rollouts, mask, n, cfg, student.config.vocab_size)
    assert plain.engine_tokens == 0 and plain.engine_delta_max == 0.0  # no engine log-probs: nothing measured
    student.zero_grad()
    out = distill_micro_batch(student, local(scorer, engine), engine, mask, n, cfg, student.config.vocab_size)
    assert out.engine_tokens == int(mask.sum())
    assert out.engine_delta_max == pytest.approx(float(torch.log(torch.tensor(3.0))), abs=1e-4)
    assert out.engine_delta_sum / out.engine_tokens == pytest.approx(float(gap[mask].mean()), abs=1e-4)
    assert out.loss == pytest.approx(plain.loss, rel=1e-5)  # no tis_cap: the loss is untouched
    capped = distill_micro_batch(student, local(scorer, engine), engine, mask, n,
                                 dataclasses.replace(cfg, tis_cap=2.0), student.config.vocab_size)
    tokens = rollouts.response_ids_B_R
    with torch.no_grad():
        teacher_logp = token_logprobs(reference_logits(teacher, rollouts), tokens)
    values = -(teacher_logp - trainer_logp) * trainer_logp
    weights = torch.where(even, 2.0, 1.0)
    assert capped.loss == pytest.approx(float((values * weights)[mask].sum() / n), rel=1e-4)
    student.zero_grad()


def reference_logits(model, rollouts):
    kw = dict(attention_mask=rollouts.attention_mask_B_L, position_ids=rollouts.position_ids_B_L)
    P = rollouts.prompt_len
    return model(rollouts.input_ids_B_L, **kw).logits[:, P - 1 : -1].float()


def reference_trainer_logprobs(student, rollouts):
    with torch.no_grad():
        return token_logprobs(reference_logits(student, rollouts), rollouts.response_ids_B_R)
