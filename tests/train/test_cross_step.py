"""With identical tokenizers the cross-tokenizer path must reduce to the same-tokenizer path: same per-token loss,
same gradients. This pins down the re-rendering, the alignment, the vocabulary map and both cross losses at once."""

import pytest
import torch

from esr.config import LossConfig
from esr.data.sources import Prompt
from esr.data.template import tokenize_prompts
from esr.models import load_model
from esr.rollout.eos import eos_token_ids
from esr.rollout.sampler import build_rollouts, left_pad
from esr.teacher.cross import CrossTokenizer
from esr.teacher.cross_score import CrossScorer
from esr.teacher.score import LocalScorer
from esr.teacher.targets import ExactTargets
from esr.train.step import distill_micro_batch

QUESTIONS = ["What is 2 + 3?", "Name a colour.", "Solve x^2 = 9.", "Write a haiku about rain."]
ANSWERS = ["2 + 3 = 5, so the answer is 5.", "Blue — like the sky 🙂", "x = \\pm 3, i.e. \\boxed{3}",
           "Rain on the tin roof\n  drums a slow, patient rhythm"]


@pytest.fixture(scope="module")
def setup():
    student, tok = load_model("tiny-student")
    teacher, _ = load_model("tiny-teacher")
    for p in student.parameters():
        p.requires_grad_(True)
    prompts = [Prompt(id=str(i), messages=({"role": "user", "content": q},), answer=None)
               for i, q in enumerate(QUESTIONS)]
    prompt_ids = tokenize_prompts(prompts, tok, 256).ids
    eos = eos_token_ids(tok, student)
    # Canonical tokenizations (what the teacher's re-encoding gives back); rows 0 and 2 stop, rows 1 and 3 are cut.
    bodies = [tok(a, add_special_tokens=False)["input_ids"] for a in ANSWERS]
    R = max(len(b) for b in bodies) + 1
    responses = [[*b, tok.convert_tokens_to_ids("<|im_end|>")] if i % 2 == 0 else (b * R)[:R]
                 for i, b in enumerate(bodies)]
    ids_B_P, mask_B_P = left_pad(prompt_ids, tok.pad_token_id)
    new_B_R = torch.full((4, R), tok.pad_token_id, dtype=torch.long)
    for b, r in enumerate(responses):
        new_B_R[b, : len(r)] = torch.tensor(r)
    rollouts = build_rollouts(ids_B_P, mask_B_P, new_B_R, eos, horizon=R)
    V = student.get_output_embeddings().weight.shape[0]
    cross = CrossTokenizer(tok, tok, student_size=V, teacher_size=V, student_eos_ids=eos, teacher_prompt_ids=prompt_ids)
    return student, LocalScorer(teacher, vocab_size=V), rollouts, cross.translate(rollouts, [0, 1, 2, 3]), cross, V


def same_tokenizer(scorer, rollouts):
    """The same-tokenizer teacher targets of ``rollouts`` as one micro-batch."""
    return ExactTargets(hidden_B_R_H=scorer.score(rollouts), head=scorer.logits)


def across_tokenizers(scorer, cross, mode, rollouts, chunk_size):
    """The cross-tokenizer scorer's targets of ``rollouts`` (prompts 0-3) as one micro-batch."""
    across = CrossScorer(scorer, cross, mode, chunk_size=chunk_size)
    (targets,) = across.targets(across.read(rollouts, [0, 1, 2, 3]), micro_batch_size=len(rollouts))
    return targets


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_identical_tokenizers_align_one_to_one(setup):
    _, _, rollouts, batch, cross, V = setup
    mask = rollouts.response_mask_B_R
    assert rollouts.cut_B.tolist() == [False, True, False, True]
    assert torch.equal(batch.exact_B_R, mask)
    assert torch.equal(batch.pair_B_R[mask], torch.arange(mask.shape[1]).expand_as(mask)[mask])
    assert torch.equal(batch.teacher.input_ids_B_L, rollouts.input_ids_B_L)
    assert len(cross.vocab_map) == V  # every token is shared, so the "renormalised" distribution is the full one


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl", "jsd"])
def test_aligned_exact_equals_same_tokenizer_loss(setup, kind):
    student, scorer, rollouts, batch, cross, V = setup
    cfg, mask = LossConfig(kind=kind, chunk_size=5), rollouts.response_mask_B_R
    n = int(mask.sum())
    same = distill_micro_batch(student, same_tokenizer(scorer, rollouts), rollouts, mask, n, cfg, V)
    same_grads = grads(student)
    aligned_targets = across_tokenizers(scorer, cross, "aligned-exact", rollouts, cfg.chunk_size)
    assert torch.equal(aligned_targets.trainable_B_R, batch.exact_B_R)
    aligned = distill_micro_batch(student, aligned_targets, rollouts, mask, n, cfg, V)
    aligned_grads = grads(student)
    torch.testing.assert_close(aligned.kl_B_R, same.kl_B_R, atol=1e-5, rtol=1e-5)
    assert aligned.loss == pytest.approx(same.loss, rel=1e-5)
    for name, g in same_grads.items():
        torch.testing.assert_close(aligned_grads[name], g, atol=1e-6, rtol=1e-4)


def test_span_sampled_equals_token_sampled(setup):
    student, scorer, rollouts, batch, cross, V = setup
    mask = rollouts.response_mask_B_R
    n = int(mask.sum())
    same = distill_micro_batch(student, same_tokenizer(scorer, rollouts), rollouts, mask, n,
                               LossConfig(kind="sampled", chunk_size=5), V)
    same_grads = grads(student)
    span_targets = across_tokenizers(scorer, cross, "span-sampled", rollouts, chunk_size=7)
    span = distill_micro_batch(student, span_targets, rollouts, mask, n, LossConfig(kind="sampled", chunk_size=7), V)
    span_grads = grads(student)
    assert span.loss == pytest.approx(same.loss, rel=1e-5)
    for name, g in same_grads.items():
        torch.testing.assert_close(span_grads[name], g, atol=1e-6, rtol=1e-4)
