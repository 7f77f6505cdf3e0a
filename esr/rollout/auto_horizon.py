"""``rollout.horizon=auto``: ESR's N picks itself from a running per-position KL profile.

The token-mass rule, the one function behind both ``esr probe kl-profile``'s recommendation and this policy
(``horizon_rule``). With KL_t(b) the reverse KL at response position t (1-based) of rollout b, counted while b is
alive at t (t <= its length, EOS included):

    M(t)  = sum_b KL_t(b)                                 the KL mass at t (what a full-rollout OPD loss sums)
    C(t)  = sum_{u<=t} M(u) / sum_u M(u)
    N*    = min { t : C(t) >= share }                     (none when the KL is 0 everywhere)
    N     = clamp(N*, ceil(N_prev / 2), 2 * N_prev)       (with a previous N: at most halve or double per update)
    N     = clamp(N, n_min, n_max)                        (the bounds are hard: they win over the step limit)

The policy keeps a running profile P over the probes (``esr/train/horizon_probe.py``), each probe's mass divided by
its rollouts, m_k(t) = M_k(t) / R, so the profile does not depend on how many rollouts a probe has:

    P_1 = m_1;   P_k = (1 - w) * P_{k-1} + w * m_k        (w = rollout.auto.ema; a shorter vector counts 0 beyond
                                                           its end)

and after each probe N = rule(P_k, N_prev). Before the first probe N = rollout.n, the first probe runs before step 1,
so step 1 already trains at a measured N, within [rollout.n / 2, 2 * rollout.n] of the user's prior.
``plan(step)`` returns the current N; the state (N, P, probes) is checkpointed and restored exactly (floats through
JSON round-trip), so a resumed run plans what an uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

RULE = "token-mass"
RULE_TEXT = ("token-mass rule: N = min t with sum_{u<=t} M(u) >= share * sum_u M(u), M(u) = KL summed over the "
             "rollouts alive at position u")
"""The rule's name and statement, as ``esr probe kl-profile`` prints it and writes it to its JSON."""


def cumulative_share(per_position_T: Sequence[float] | np.ndarray) -> np.ndarray:
    """C(t) = sum_{u<=t} m(u) / sum_u m(u), NaN entries counted as 0; all zeros when the total is 0."""
    m = np.nan_to_num(np.asarray(per_position_T, dtype=np.float64), nan=0.0)
    total = m.sum()
    return np.cumsum(m) / total if total > 0 else np.zeros_like(m)


def recommend_n(cumulative_T: Sequence[float] | np.ndarray, share: float) -> int | None:
    """N = the smallest 1-based t with C(t) >= share (1e-12 tolerance for float sums); None if C never gets there."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    hits = np.nonzero(np.asarray(cumulative_T, dtype=np.float64) >= share - 1e-12)[0]
    return int(hits[0]) + 1 if hits.size else None


def horizon_rule(mass_T: Sequence[float] | np.ndarray, share: float, *, n_min: int = 1, n_max: int | None = None,
                 previous: int | None = None) -> int | None:
    """The token-mass rule (module docstring) on the per-position KL mass ``mass_T``: N*, given ``previous``
    clamped to [ceil(previous / 2), 2 * previous], then to [n_min, n_max]. None when the mass is 0 everywhere and
    there is no previous N to keep."""
    n = recommend_n(cumulative_share(mass_T), share)
    if n is None:
        return previous
    if previous is not None:
        n = min(2 * previous, max(math.ceil(previous / 2), n))
    return max(n_min, n if n_max is None else min(n_max, n))


def running_profile(profile_T: Sequence[float] | np.ndarray | None, mass_T: Sequence[float] | np.ndarray,
                    weight: float) -> np.ndarray:
    """P_k = (1 - weight) * P_{k-1} + weight * m_k (module docstring); the first probe's profile is m_1 itself."""
    m = np.asarray(mass_T, dtype=np.float64)
    if profile_T is None or len(profile_T) == 0:
        return m.copy()
    p = np.asarray(profile_T, dtype=np.float64)
    size = max(len(p), len(m))
    p, m = np.pad(p, (0, size - len(p))), np.pad(m, (0, size - len(m)))
    return (1.0 - weight) * p + weight * m


class AutoHorizon:
    """The ``rollout.horizon=auto`` policy: N from the running KL profile, updated by ``update`` after each probe."""

    def __init__(self, n: int, share: float, n_min: int, n_max: int, weight: float) -> None:
        self.n, self.share, self.n_min, self.n_max, self.weight = n, share, n_min, n_max, weight
        self.profile_T: np.ndarray | None = None
        self.probes = 0
        self.seconds_probe = 0.0  # wall time of the probes so far (for probe_share; not part of the plan)
        self.seconds_run = 0.0  # wall time of the steps and probes so far

    def plan(self, step: int) -> int:
        return self.n

    def update(self, mass_T: Sequence[float] | np.ndarray) -> int:
        """Fold one probe's per-position KL mass per rollout into the profile and move N by the rule; returns N."""
        self.profile_T = running_profile(self.profile_T, mass_T, self.weight)
        self.n = horizon_rule(self.profile_T, self.share, n_min=self.n_min, n_max=self.n_max, previous=self.n) or self.n
        self.probes += 1
        return self.n

    def state_dict(self) -> dict[str, Any]:
        return {"n": self.n, "probes": self.probes, "seconds_probe": self.seconds_probe,
                "seconds_run": self.seconds_run,
                "profile": None if self.profile_T is None else [float(x) for x in self.profile_T]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n, self.probes = int(state["n"]), int(state["probes"])
        self.seconds_probe, self.seconds_run = float(state["seconds_probe"]), float(state["seconds_run"])
        self.profile_T = None if state["profile"] is None else np.asarray(state["profile"], dtype=np.float64)
