"""Per-row sampling (esr/rollout/sampler.py): a row's sample depends on (seed, row id, prompt) only, and it is an
exact sample of softmax(top_p(logits / T))."""

import pytest
import torch

from esr.models import load_model
from esr.rollout.sampler import HFSampler, RowSampling, row_seed

QUESTIONS = ["What is 2 + 3?", "Name a prime number larger than ten, please.", "Hi", "Count to five, slowly."]


@pytest.fixture(scope="module")
def student(needs_smollm2_package):
    model, tok = load_model("tiny-student")
    return model, tok, [tok(q).input_ids for q in QUESTIONS]


def _sampler(model, tok, **kw):
    kw = {"temperature": 0.7, **kw}
    return HFSampler(model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id, **kw)


def _responses(rollouts):
    return [rollouts.response_ids_B_R[b, : int(rollouts.lengths_B[b])].tolist() for b in range(len(rollouts))]


def _chi2(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_rows_sample_does_not_depend_on_the_rest_of_the_batch(student):
    model, tok, prompts = student
    sampler = _sampler(model, tok, top_p=0.95)
    batch = _responses(sampler.sample(prompts, 12, seed=7))
    assert len({tuple(r) for r in batch}) == 4  # different rows, different samples
    for b in range(4):
        alone = _responses(sampler.sample([prompts[b]], 12, seed=7, row_ids=[b]))[0]
        assert alone == batch[b]
    order = [2, 0, 3, 1]  # same global ids at other positions, other left padding
    moved = _responses(sampler.sample([prompts[b] for b in order], 12, seed=7, row_ids=order, pad_to=40))
    assert moved == [batch[b] for b in order]
    chunked = _responses(_sampler(model, tok, top_p=0.95, batch_size=3).sample(prompts, 12, seed=7))
    assert chunked == batch
    assert _responses(sampler.sample(prompts, 12, seed=8)) != batch  # the seed matters


def test_row_sampling_draws_the_tempered_softmax():
    """20k rows of one 12-token distribution: chi-square against softmax(logits / T) is small, and against the
    untempered softmax large (the test can fail)."""
    V, N, T = 12, 20_000, 0.7
    logits_V = torch.tensor([2.0, 1.5, 1.0, 0.8, 0.5, 0.0, -0.3, -0.7, -1.0, -1.5, -2.0, -3.0])
    out_N_V = RowSampling(T, 1.0, seed=11, row_ids=range(N))(torch.zeros((N, 1), dtype=torch.long),
                                                           logits_V.expand(N, V).clone())
    assert bool((out_N_V == 0).sum(dim=1).eq(1).all())  # exactly one finite entry per row: greedy takes it
    counts_V = torch.bincount(out_N_V.argmax(dim=1), minlength=V).double()
    # df = 11: P(chi2 > 35) ~ 2.5e-4 for a correct sampler; T=1 instead of 0.7 gives chi2 in the thousands
    assert _chi2(counts_V, torch.softmax(logits_V.double() / T, -1)) < 35
    assert _chi2(counts_V, torch.softmax(logits_V.double(), -1)) > 200


def test_row_sampling_top_p_keeps_only_the_nucleus():
    V, N = 12, 20_000
    logits_V = torch.tensor([2.0, 1.5, 1.0, 0.8, 0.5, 0.0, -0.3, -0.7, -1.0, -1.5, -2.0, -3.0])
    out_N_V = RowSampling(1.0, 0.8, seed=3, row_ids=range(N))(torch.zeros((N, 1), dtype=torch.long),
                                                            logits_V.expand(N, V).clone())
    counts_V = torch.bincount(out_N_V.argmax(dim=1), minlength=V).double()
    p_V = torch.softmax(logits_V.double(), -1)
    keep = int((p_V.cumsum(0) < 0.8).sum()) + 1  # the smallest prefix with mass >= 0.8
    assert counts_V[keep:].sum() == 0 and bool((counts_V[:keep] > 0).all())
    nucleus = p_V[:keep] / p_V[:keep].sum()
    assert _chi2(counts_V[:keep], nucleus) < 30


def test_streams_are_keyed_by_seed_and_row_only():
    assert len({row_seed(s, r) for s in range(50) for r in range(50)}) == 2500
    scores = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    a = RowSampling(1.0, 1.0, seed=5, row_ids=[0, 1, 2])
    b = RowSampling(1.0, 1.0, seed=5, row_ids=[2, 1, 0])
    ids = torch.zeros((3, 1), dtype=torch.long)
    for _ in range(3):  # step after step, each row's stream advances alone
        assert torch.equal(a(ids, scores).argmax(1), b(ids, scores.flip(0)).argmax(1).flip(0))


def test_first_tokens_of_the_model_follow_its_distribution(student):
    """Through ``generate``: 400 first tokens of one prompt at T = 0.05 (top token p ~ 0.6) against the model's
    own softmax(logits / T), binned as its 4 likeliest tokens and the rest."""
    model, tok, prompts = student
    N, T = 400, 0.05
    with torch.no_grad():
        logits_V = model(torch.tensor([prompts[0]])).logits[0, -1].double()
    first_N = _sampler(model, tok, temperature=T, batch_size=100).sample([prompts[0]] * N, 1, seed=0)
    tokens_N = first_N.response_ids_B_R[:, 0]

    def binned(temp):
        p_V = torch.softmax(logits_V / temp, -1)
        top = torch.topk(p_V, 4).indices
        probs = torch.cat([p_V[top], (1 - p_V[top].sum()).reshape(1)])
        counts = torch.stack([(tokens_N == t).sum() for t in top] + [(~torch.isin(tokens_N, top)).sum()])
        return counts.double(), probs

    counts, probs = binned(T)
    assert probs[0] > 0.5 and _chi2(counts, probs) < 25  # df = 4: P(chi2 > 25) ~ 5e-5
    assert _chi2(*binned(0.1)) > 100


def test_min_new_tokens_blocks_eos_and_temperature_zero_is_greedy(student):
    model, tok, prompts = student
    with torch.no_grad():
        favourite = int(model(torch.tensor([prompts[0]])).logits[0, -1].argmax())
    kw = {"eos_token_ids": [favourite], "pad_token_id": tok.pad_token_id, "temperature": 0.05}
    free = HFSampler(model, **kw).sample([prompts[0]] * 32, 6, seed=1)
    assert int((free.lengths_B == 1).sum()) > 8  # the "EOS" is the likeliest first token
    held = HFSampler(model, min_new_tokens=3, **kw).sample([prompts[0]] * 32, 6, seed=1)
    assert bool((held.lengths_B >= 4).all())
    assert not bool(torch.isin(held.response_ids_B_R[:, :3], torch.tensor([favourite])).any())
    greedy = _sampler(model, tok, temperature=0)
    a, b = greedy.sample(prompts, 5, seed=0), greedy.sample(prompts, 5, seed=99)
    assert torch.equal(a.response_ids_B_R, b.response_ids_B_R)
    assert int(a.response_ids_B_R[0, 0]) == favourite


def test_uniforms_drawn_in_blocks_are_the_streams_one_at_a_time():
    """RowSampling draws each row's uniforms BLOCK at a time (one host-to-device copy per block); across block
    boundaries the t-th token must still be the inverse-CDF pick of the stream's t-th uniform drawn alone."""
    V, steps = 50, 2 * RowSampling.BLOCK + 5
    sampler = RowSampling(0.7, 1.0, seed=9, row_ids=[4, 1])
    gens = [torch.Generator().manual_seed(row_seed(9, r)) for r in (4, 1)]
    ids = torch.zeros((2, 1), dtype=torch.long)
    rng = torch.Generator().manual_seed(0)
    for _ in range(steps):
        scores = torch.randn(2, V, generator=rng)
        cdf = torch.softmax(scores / 0.7, -1).double().cumsum(-1)
        u = torch.cat([torch.rand((1,), generator=g, dtype=torch.float64) for g in gens])
        expected = [int(torch.searchsorted(cdf[b], u[b : b + 1] * cdf[b, -1], right=True)) for b in range(2)]
        assert sampler(ids, scores).argmax(1).tolist() == expected
