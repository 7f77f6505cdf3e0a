"""Percentile-bootstrap intervals over prompts: how sure a mean is, and whether two targets differ.

A target measured on n prompts gives one value x_i per prompt (e.g. its mean per-token reverse KL on prompt i).
Its estimate is the prompt mean m = (1/n) sum_i x_i. The percentile bootstrap resamples the PROMPTS: draw n indices
i*_1..i*_n uniformly with replacement, B times (``RESAMPLES``), take each resample's mean m*_b, and report

    [q_{alpha/2}(m*), q_{1-alpha/2}(m*)],   alpha = 1 - level (0.05 for a 95% interval),

the empirical quantiles of the B resampled means (numpy's linear interpolation). Undefined values (None / NaN: a
prompt whose rollout has no token in the range) are left out first, so n counts the defined prompts.

Two targets measured on the SAME prompts are compared pairwise: with d_i = y_i - x_i over the prompts where both
are defined, the difference of means is mean(d) and its interval the bootstrap of d, i.e. the two targets resampled
jointly (the same prompt indices for both), which removes the between-prompt variance both share. The verdict:

    "lower"                 the whole interval is below 0  (y has a lower mean than x)
    "higher"                the whole interval is above 0
    "not distinguishable"   the interval contains 0 (or fewer than 2 paired prompts)

Every call with the same values and ``seed`` gives the same interval (numpy's PCG64 generator, seeded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
"""Bootstrap resamples per interval."""
LEVEL = 0.95
"""Coverage of the intervals."""
SEED = 0
"""Generator seed of the resampling (fixed: the same data give the same interval)."""

LOWER, HIGHER, UNDECIDED = "lower", "higher", "not distinguishable"


@dataclass(frozen=True)
class Interval:
    """A mean over prompts with its percentile-bootstrap interval; ``low``/``high`` are None when n == 0."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    """Prompts with a defined value (those averaged and resampled)."""


@dataclass(frozen=True)
class Comparison:
    """Paired difference of means (other - reference) over prompts defined for both, with its interval and verdict."""

    difference: Interval
    verdict: str
    """``lower`` | ``higher`` | ``not distinguishable`` (module docstring)."""


def defined(values: Sequence[float | None]) -> np.ndarray:
    """The values that are numbers (None and NaN dropped), as float64."""
    return np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)


def bootstrap_mean(values: Sequence[float | None], *, resamples: int = RESAMPLES, level: float = LEVEL,
                   seed: int = SEED) -> Interval:
    """The prompt mean of ``values`` and its percentile-bootstrap interval (module docstring)."""
    return _interval(defined(values), resamples, level, seed)


def paired_difference(reference: Sequence[float | None], other: Sequence[float | None], *,
                      resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> Comparison:
    """mean(other - reference) over the prompts both define, its bootstrap interval (prompts resampled jointly) and
    the verdict word. ``reference`` and ``other`` hold one value per prompt, in the same prompt order."""
    if len(reference) != len(other):
        raise ValueError(f"paired values need the same prompts: {len(reference)} vs {len(other)} values")
    pairs = [(a, b) for a, b in zip(reference, other, strict=True)
             if a is not None and b is not None and not math.isnan(a) and not math.isnan(b)]
    d = np.array([b - a for a, b in pairs], dtype=np.float64)
    interval = _interval(d, resamples, level, seed)
    return Comparison(interval, verdict(interval))


def verdict(difference: Interval) -> str:
    """``lower`` / ``higher`` when the interval of other - reference excludes 0, else ``not distinguishable``."""
    if difference.n < 2 or difference.low is None or difference.high is None:
        return UNDECIDED
    if difference.high < 0:
        return LOWER
    if difference.low > 0:
        return HIGHER
    return UNDECIDED


def _interval(x: np.ndarray, resamples: int, level: float, seed: int) -> Interval:
    n = len(x)
    if n == 0:
        return Interval(None, None, None, 0)
    rng = np.random.default_rng(seed)
    means_B = x[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    alpha = 1.0 - level
    low, high = np.quantile(means_B, [alpha / 2, 1 - alpha / 2])
    return Interval(float(x.mean()), float(low), float(high), n)
