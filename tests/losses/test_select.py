"""Token selectors, position weights and entropy on hand-made tensors, expected values worked out by hand."""

import math
import typing

import pytest
import torch

from esr.config import Select
from esr.losses import SELECTORS, entropy, needed_scores, position_weights, select_tokens


def mask(*rows: str) -> torch.Tensor:
    """'1101' -> [True, True, False, True]: one string per row."""
    return torch.tensor([[c == "1" for c in row] for row in rows])


def positions(select_B_R: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in select_B_R]


# Row 0: 6 valid tokens; row 1: 2 (fewer than n); row 2: none; row 3: valid at 0, 2, 3, 5, 6 (an alignment mask).
M = mask("11111100", "11000000", "00000000", "10110110")


@pytest.mark.parametrize(
    ("kind", "n", "expected"),
    [
        ("all", 3, [[0, 1, 2, 3, 4, 5], [0, 1], [], [0, 2, 3, 5, 6]]),
        ("first-n", 3, [[0, 1, 2], [0, 1], [], [0, 2, 3]]),
        ("last-n", 3, [[3, 4, 5], [0, 1], [], [3, 5, 6]]),
        # middle-n starts at rank floor((L - n) / 2): L=6 -> rank 1; L=5 -> rank 1 (positions 2, 3, 5).
        ("middle-n", 3, [[1, 2, 3], [0, 1], [], [2, 3, 5]]),
        ("middle-n", 2, [[2, 3], [0, 1], [], [2, 3]]),  # L=6: rank 2, 3; L=5: floor(3/2)=1 -> ranks 1, 2
        ("first-n", 10, [[0, 1, 2, 3, 4, 5], [0, 1], [], [0, 2, 3, 5, 6]]),
        ("last-n", 1, [[5], [1], [], [6]]),
    ],
)
def test_position_selectors(kind, n, expected):
    assert positions(select_tokens(kind, n, M)) == expected


def test_middle_n_centres_odd_leftover_early():
    # L=7, n=3: start rank floor(4/2)=2 -> 2, 3, 4 (exactly centred); L=5, n=2: floor(3/2)=1 -> 1, 2 (leans early).
    assert positions(select_tokens("middle-n", 3, mask("1111111"))) == [[2, 3, 4]]
    assert positions(select_tokens("middle-n", 2, mask("11111"))) == [[1, 2]]


KL = torch.tensor([
    [0.5, 2.0, 2.0, 0.1, 3.0, 2.0, 9.0, 9.0],  # 9.0 on invalid positions must never be picked
    [1.0, 1.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0],
    [7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0, 7.0],
    [0.0, 8.0, 1.0, 4.0, 8.0, 4.0, 4.0, 8.0],
])


def test_top_kl_n_ties_go_to_the_earliest_position():
    # Row 0: 3.0 at 4, then the 2.0 tie at 1, 2, 5 -> 1, 2. Row 1: 2 valid < n. Row 3: valid 0,2,3,5,6 with
    # KL 0,1,4,4,4 -> the 4.0 tie at 3, 5, 6 keeps all three.
    assert positions(select_tokens("top-kl-n", 3, M, kl_B_R=KL)) == [[1, 2, 4], [0, 1], [], [3, 5, 6]]
    # n=2: the 4.0 tie in row 3 is broken toward the earliest positions 3, 5.
    assert positions(select_tokens("top-kl-n", 2, M, kl_B_R=KL)) == [[1, 4], [0, 1], [], [3, 5]]


def test_entropy_selectors_rank_their_own_score():
    m = mask("1111", "1110")
    hs = torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 99.0]])
    ht = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 1.0, 99.0]])
    assert positions(select_tokens("top-student-entropy-n", 2, m, student_entropy_B_R=hs)) == [[2, 3], [0, 1]]
    assert positions(select_tokens("top-teacher-entropy-n", 2, m, teacher_entropy_B_R=ht)) == [[0, 1], [0, 1]]


def test_product_selectors():
    m = mask("1111")
    kl = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    hs = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    ht = torch.tensor([[1.0, 1.0, 2.0, 0.5]])
    # kl*hs = [4, 6, 6, 4]: n=1 -> the tie 6 at 1, 2 goes to 1; n=3 -> 1, 2 and the tie 4 at 0, 3 goes to 0.
    assert positions(select_tokens("kl*hs", 1, m, kl_B_R=kl, student_entropy_B_R=hs)) == [[1]]
    assert positions(select_tokens("kl*hs", 3, m, kl_B_R=kl, student_entropy_B_R=hs)) == [[0, 1, 2]]
    # ht*hs = [4, 3, 4, 0.5] -> 0, 2.
    assert positions(select_tokens("ht*hs", 2, m, teacher_entropy_B_R=ht, student_entropy_B_R=hs)) == [[0, 2]]
    # kl*ht*hs = [4, 6, 12, 2] -> 1, 2; no single factor picks that pair (kl: 2, 3; hs: 0, 1; ht: 0, 2).
    got = select_tokens("kl*ht*hs", 2, m, kl_B_R=kl, teacher_entropy_B_R=ht, student_entropy_B_R=hs)
    assert positions(got) == [[1, 2]]
    assert positions(select_tokens("top-kl-n", 2, m, kl_B_R=kl)) == [[2, 3]]


def test_nan_score_counts_as_largest():
    m = mask("111")
    assert positions(select_tokens("top-kl-n", 1, m, kl_B_R=torch.tensor([[1.0, float("nan"), 3.0]]))) == [[1]]


def test_random_n_draws_n_valid_tokens_from_the_generator():
    def draw(seed):
        return select_tokens("random-n", 3, M, generator=torch.Generator().manual_seed(seed))

    a = draw(7)
    assert a.sum(dim=1).tolist() == [3, 2, 0, 3] and not (a & ~M).any()
    assert torch.equal(a, draw(7))  # the generator is the only source of randomness
    assert any(not torch.equal(a, draw(s)) for s in range(8, 12))
    # Uniform: each of row 0's 6 valid tokens is kept with probability 3/6.
    g = torch.Generator().manual_seed(0)
    freq_R = sum(select_tokens("random-n", 3, M, generator=g)[0].float() for _ in range(2000)) / 2000
    assert torch.allclose(freq_R[:6], torch.full((6,), 0.5), atol=0.05) and freq_R[6:].sum() == 0


def test_selector_errors():
    with pytest.raises(ValueError, match="unknown selector"):
        select_tokens("top-n", 3, M)
    with pytest.raises(ValueError, match="needs the per-token score 'hs'"):
        select_tokens("kl*hs", 3, M, kl_B_R=KL)
    with pytest.raises(ValueError, match="n must be >= 1"):
        select_tokens("first-n", 0, M)


def test_selectors_match_the_config_choices():
    assert typing.get_args(Select) == SELECTORS
    assert needed_scores("kl*ht*hs") == ("kl", "ht", "hs") and needed_scores("random-n") == ()


def test_position_weights_by_hand():
    # gamma=2, T=4: w_t = 1 + 2 (1 - t/4) = 3, 2.5, 2, 1.5; T=2: 3, 2; padding 0.
    w = position_weights(mask("11110", "11000"), 2.0)
    assert w.tolist() == [[3.0, 2.5, 2.0, 1.5, 0.0], [3.0, 2.0, 0.0, 0.0, 0.0]]
    assert position_weights(mask("110", "000"), 0.0).tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        position_weights(M, -0.5)


def test_entropy_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), float("-inf"), float("-inf")],
                            [5.0, float("-inf"), float("-inf"), float("-inf")]]])
    # uniform over 4: log 4; p = (1/4, 3/4): -(1/4 log 1/4 + 3/4 log 3/4); one certain token: 0.
    expected = [math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), 0.0]
    got = entropy(logits)
    assert got.dtype == torch.float32 and got.shape == (1, 3)
    assert got[0].tolist() == pytest.approx(expected, abs=1e-6)
    assert torch.isfinite(got).all()
