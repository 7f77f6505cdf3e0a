"""Sample-level metrics of an evaluation with n samples per problem.

- pass@k, the unbiased estimator of Chen et al. (2021) from n samples of which c are correct:
      pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i),
  the product form avoids the huge binomials (and is 1 exactly when n - c < k).
- avg@k: the mean of k verdicts (the expected pass@1 from k samples).
- maj@k: the answers are grouped into clusters of mutually equivalent answers (each answer joins the first cluster
  whose first answer it is equivalent to), the largest cluster wins (ties: the cluster that appeared first; None
  answers never vote), and maj@k is whether the winner is equivalent to the gold answer.
- length_stats: p10 / p50 / p90 (linear interpolation between order statistics, as numpy's default), mean and max.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not (n >= 1 and 1 <= k <= n):
        raise ValueError(f"pass@k needs 1 <= k <= n, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(verdicts: Sequence[bool]) -> float:
    """Mean of the verdicts (True = 1); raises ValueError on an empty sequence."""
    if len(verdicts) == 0:
        raise ValueError("avg@k of no verdicts")
    return sum(bool(v) for v in verdicts) / len(verdicts)


def maj_at_k(
    answers: Sequence[str | None], gold: str, equivalent: Callable[[str | None, str], bool]
) -> bool:
    """Whether the majority answer (module docstring) is equivalent to ``gold``; False when every answer is None."""
    clusters: list[list[str]] = []  # in order of first appearance; clusters[i][0] is the representative
    for answer in answers:
        if answer is None:
            continue
        for cluster in clusters:
            if equivalent(answer, cluster[0]):
                cluster.append(answer)
                break
        else:
            clusters.append([answer])
    if not clusters:
        return False
    winner = max(clusters, key=len)  # max keeps the first of equal sizes: ties go to the earliest cluster
    return bool(equivalent(winner[0], gold))


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear interpolation between order statistics at position q * (n - 1) (numpy's default method)."""
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """``{"p10", "p50", "p90", "mean", "max"}`` of the lengths (floats); raises ValueError when empty."""
    if len(lengths) == 0:
        raise ValueError("length_stats of no lengths")
    ordered = sorted(lengths)
    return {
        "p10": _quantile(ordered, 0.10),
        "p50": _quantile(ordered, 0.50),
        "p90": _quantile(ordered, 0.90),
        "mean": sum(ordered) / len(ordered),
        "max": float(ordered[-1]),
    }
