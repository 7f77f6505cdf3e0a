"""Percentile bootstrap over prompts (esr/analysis/bootstrap.py) on hand-made data: known means, coverage, paired
verdicts."""

import numpy as np
import pytest

from esr.analysis.bootstrap import (
    HIGHER,
    LOWER,
    UNDECIDED,
    Interval,
    bootstrap_mean,
    paired_difference,
    verdict,
)


def test_mean_and_interval_of_known_values():
    iv = bootstrap_mean([1.0, 2.0, 3.0, 4.0])
    assert iv.mean == pytest.approx(2.5) and iv.n == 4
    assert 1.0 <= iv.low < 2.5 < iv.high <= 4.0
    const = bootstrap_mean([0.3] * 10)  # every resample has the same mean
    assert (const.mean, const.low, const.high) == pytest.approx((0.3, 0.3, 0.3))
    assert bootstrap_mean([1.0, 2.0, 3.0, 4.0]) == iv  # fixed seed: the same interval every time


def test_undefined_values_are_left_out():
    iv = bootstrap_mean([1.0, None, 3.0, float("nan")])
    assert iv.n == 2 and iv.mean == pytest.approx(2.0)
    assert bootstrap_mean([None, None]) == Interval(None, None, None, 0)


def test_the_95_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    trials, covered = 200, 0
    for _ in range(trials):
        x = rng.exponential(scale=0.2, size=60)  # skewed like per-prompt KL; true mean 0.2
        iv = bootstrap_mean(x.tolist(), resamples=1000)
        covered += iv.low <= 0.2 <= iv.high
    assert 0.88 <= covered / trials <= 0.99, covered
    narrow = bootstrap_mean(rng.exponential(scale=0.2, size=600).tolist())
    wide = bootstrap_mean(rng.exponential(scale=0.2, size=30).tolist())
    assert narrow.high - narrow.low < wide.high - wide.low  # more prompts, a narrower interval


def test_paired_verdicts():
    base = [0.1 * i for i in range(30)]  # large between-prompt spread
    lower = [x - 0.05 for x in base]  # every prompt 0.05 lower
    # Unpaired, the two intervals overlap widely; paired, the constant difference is certain.
    a, b = bootstrap_mean(base), bootstrap_mean(lower)
    assert b.high > a.low
    down = paired_difference(base, lower)
    assert down.verdict == LOWER and down.difference.mean == pytest.approx(-0.05)
    assert down.difference.high == pytest.approx(-0.05)
    assert paired_difference(base, [x + 0.05 for x in base]).verdict == HIGHER
    wobble = [x + (0.05 if i % 2 else -0.05) for i, x in enumerate(base)]  # differences of mean 0
    same = paired_difference(base, wobble)
    assert same.verdict == UNDECIDED and same.difference.low < 0 < same.difference.high


def test_paired_difference_uses_prompts_both_define():
    c = paired_difference([1.0, None, 2.0, 4.0], [0.5, 9.0, None, 3.0])
    assert c.difference.n == 2 and c.difference.mean == pytest.approx(-0.75)
    assert paired_difference([1.0], [0.0]).verdict == UNDECIDED  # one prompt: no interval to speak of
    assert verdict(Interval(None, None, None, 0)) == UNDECIDED
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([1.0, 2.0], [1.0])
