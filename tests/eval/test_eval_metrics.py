"""pass@k against brute force over k-subsets, avg@k, maj@k with equivalence clustering, length statistics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from esr.eval.math_answer import is_equivalent
from esr.eval.metrics import avg_at_k, length_stats, maj_at_k, pass_at_k


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize(
    ("n", "c", "k"),
    [(1, 0, 1), (1, 1, 1), (5, 0, 3), (5, 1, 1), (5, 2, 3), (6, 3, 2), (8, 1, 4), (8, 5, 4), (10, 3, 5), (10, 10, 7),
     (12, 2, 6), (7, 4, 7)],
)
def test_pass_at_k_matches_brute_force(n: int, c: int, k: int) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_closed_forms_and_large_n() -> None:
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100))
    assert pass_at_k(1000, 999, 1) == pytest.approx(0.999)
    assert 0.0 <= pass_at_k(5000, 1, 10) <= 1.0


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (3, 4, 1), (3, -1, 1), (3, 1, 0), (0, 0, 1)])
def test_pass_at_k_rejects_bad_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_avg_at_k() -> None:
    assert avg_at_k([True, False, True, True]) == pytest.approx(0.75)
    assert avg_at_k([False]) == 0.0
    with pytest.raises(ValueError):
        avg_at_k([])


def _string_eq(a: str | None, b: str) -> bool:
    return a is not None and a == b


def test_maj_at_k_plain_votes_and_ties() -> None:
    assert maj_at_k(["3", "5", "3"], "3", _string_eq)
    assert not maj_at_k(["5", "3", "5"], "3", _string_eq)
    assert maj_at_k(["3", "5"], "3", _string_eq)  # tie: the first answer's cluster wins
    assert not maj_at_k(["5", "3"], "3", _string_eq)
    assert maj_at_k(["5", "3", "3", "5"], "5", _string_eq)  # tie of 2-2: "5" appeared first


def test_maj_at_k_none_never_wins() -> None:
    assert maj_at_k([None, None, None, "3"], "3", _string_eq)
    assert not maj_at_k([None, None], "3", _string_eq)
    assert not maj_at_k([], "3", _string_eq)


def test_maj_at_k_equivalent_answers_vote_together() -> None:
    answers = ["0.25", "0.5", "\\frac{1}{2}", "1/2", "0.25", None, None, None]
    assert maj_at_k(answers, "\\dfrac{1}{2}", is_equivalent)
    assert not maj_at_k(answers, "0.25", is_equivalent)
    assert maj_at_k(["1,234", "1234", "99"], "1234", is_equivalent)


def test_length_stats_matches_numpy() -> None:
    lengths = [5, 1, 9, 100, 42, 42, 7, 3, 18, 64, 2]
    stats = length_stats(lengths)
    assert set(stats) == {"p10", "p50", "p90", "mean", "max"}
    for key, q in (("p10", 10), ("p50", 50), ("p90", 90)):
        assert stats[key] == pytest.approx(float(np.percentile(lengths, q)))
    assert stats["mean"] == pytest.approx(float(np.mean(lengths)))
    assert stats["max"] == 100.0
    assert length_stats([7]) == {"p10": 7.0, "p50": 7.0, "p90": 7.0, "mean": 7.0, "max": 7.0}
    with pytest.raises(ValueError):
        length_stats([])
