"""Which generated tokens get loss (``loss.select``), how much each weighs (``loss.position_gamma``), and entropy.

ESR shortens the rollout itself (the horizon). The paper's token-selection ablation instead generates the full
rollout and trains only some of its tokens; these are the pure tensor functions behind that knob.

Every selector works per sequence, among that row's valid tokens (``mask_B_R``; L_b of them in row b), and keeps
k_b = min(n, L_b) of them: a row with fewer valid tokens than n keeps all of them. With ``rank`` the index of a
valid token among its row's valid tokens (0, 1, ..., L_b - 1, in position order):

    all                     every valid token
    first-n                 rank < n
    last-n                  rank >= L_b - n
    middle-n                s_b <= rank < s_b + n,  s_b = floor((L_b - n) / 2)   (centred; leans early when odd)
    random-n                n valid tokens uniformly at random without replacement (from ``generator``)
    top-kl-n                the n largest KL(p_s || p_t)
    top-student-entropy-n   the n largest H(p_s)
    top-teacher-entropy-n   the n largest H(p_t)
    kl*hs                   the n largest KL * H(p_s)
    ht*hs                   the n largest H(p_t) * H(p_s)
    kl*ht*hs                the n largest KL * H(p_t) * H(p_s)

Ties among scores go to the earliest position, so the choice is deterministic. A NaN score counts as +inf: a
broken token is selected, so the training loop's non-finite check sees it instead of it being hidden.
"""

from __future__ import annotations

import torch

__all__ = ["SCORE_SELECTORS", "SELECTORS", "entropy", "needed_scores", "position_weights", "select_tokens"]

SELECTORS: tuple[str, ...] = (
    "all", "first-n", "last-n", "middle-n", "random-n", "top-kl-n", "top-student-entropy-n",
    "top-teacher-entropy-n", "kl*hs", "ht*hs", "kl*ht*hs",
)
"""Every valid ``loss.select``."""

SCORE_SELECTORS: dict[str, tuple[str, ...]] = {
    "top-kl-n": ("kl",),
    "top-student-entropy-n": ("hs",),
    "top-teacher-entropy-n": ("ht",),
    "kl*hs": ("kl", "hs"),
    "ht*hs": ("ht", "hs"),
    "kl*ht*hs": ("kl", "ht", "hs"),
}
"""Selectors that rank tokens by per-token scores, and the factors of their score: ``kl`` = KL(p_s || p_t),
``hs`` = H(p_s), ``ht`` = H(p_t). The others need no score (and no extra compute)."""


def needed_scores(kind: str) -> tuple[str, ...]:
    """The per-token quantities selector ``kind`` ranks by (empty for the position and random selectors)."""
    return SCORE_SELECTORS.get(kind, ())


def entropy(logits_B_T_V: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of the next-token distribution at every position, in nats.

        H(p) = -sum_v p(v) log p(v),   log p = log_softmax(logits) in at least float32,  0 * log 0 = 0

    Args:
        logits_B_T_V: logits, (B, T, V), any float dtype (a ``-inf`` logit is a token of probability 0).

    Returns:
        entropy_B_T: (B, T), float32 (float64 for float64 logits), >= 0.
    """
    dtype = torch.promote_types(logits_B_T_V.dtype, torch.float32)
    logp_B_T_V = torch.log_softmax(logits_B_T_V.to(dtype), dim=-1)
    p_B_T_V = logp_B_T_V.exp()
    plogp_B_T_V = torch.where(p_B_T_V > 0, p_B_T_V * logp_B_T_V, torch.zeros_like(p_B_T_V))
    return -plogp_B_T_V.sum(dim=-1)


def select_tokens(
    kind: str,
    n: int,
    mask_B_R: torch.Tensor,
    *,
    kl_B_R: torch.Tensor | None = None,
    student_entropy_B_R: torch.Tensor | None = None,
    teacher_entropy_B_R: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The tokens selector ``kind`` trains: bool (B, R), a subset of ``mask_B_R`` (module docstring for each rule).

    Args:
        kind: one of ``SELECTORS``.
        n: tokens kept per row, >= 1 (ignored by ``all``).
        mask_B_R: bool (B, R), the row's valid tokens (generated, and pairable across tokenizers).
        kl_B_R, student_entropy_B_R, teacher_entropy_B_R: (B, R) per-token scores; those named by
            ``needed_scores(kind)`` are required, on the mask's device. Values off the mask are ignored.
        generator: the source of ``random-n``'s draw (seed it per step for exact resumes); a CPU generator.

    Returns:
        select_B_R: bool (B, R), with min(n, L_b) True entries in row b, all inside ``mask_B_R``.
    """
    if kind not in SELECTORS:
        raise ValueError(f"unknown selector {kind!r}; expected one of {', '.join(SELECTORS)}")
    mask_B_R = mask_B_R.bool()
    if kind == "all":
        return mask_B_R.clone()
    if n < 1:
        raise ValueError(f"select_tokens: n must be >= 1, got {n}")
    if kind in ("first-n", "last-n", "middle-n"):
        return _by_rank(kind, n, mask_B_R)
    if kind == "random-n":
        score_B_R = torch.rand(mask_B_R.shape, generator=generator).to(mask_B_R.device)
        return top_n_per_row(score_B_R, n, mask_B_R)
    named = {"kl": kl_B_R, "hs": student_entropy_B_R, "ht": teacher_entropy_B_R}
    score_B_R = torch.ones(mask_B_R.shape, dtype=torch.float32, device=mask_B_R.device)
    for factor in SCORE_SELECTORS[kind]:
        value_B_R = named[factor]
        if value_B_R is None:
            raise ValueError(f"selector {kind!r} needs the per-token score {factor!r}")
        score_B_R = score_B_R * value_B_R.to(score_B_R)
    return top_n_per_row(score_B_R, n, mask_B_R)


def _by_rank(kind: str, n: int, mask_B_R: torch.Tensor) -> torch.Tensor:
    """first-n / last-n / middle-n from each valid token's rank among its row's valid tokens."""
    rank_B_R = mask_B_R.long().cumsum(dim=1) - 1
    length_B1 = mask_B_R.sum(dim=1, keepdim=True)
    if kind == "first-n":
        start_B1 = torch.zeros_like(length_B1)
    elif kind == "last-n":
        start_B1 = (length_B1 - n).clamp(min=0)
    else:  # middle-n
        start_B1 = torch.div(length_B1 - n, 2, rounding_mode="floor").clamp(min=0)
    return mask_B_R & (rank_B_R >= start_B1) & (rank_B_R < start_B1 + n)


def top_n_per_row(score_B_R: torch.Tensor, n: int, mask_B_R: torch.Tensor) -> torch.Tensor:
    """The n highest-scoring valid tokens of each row (all of them when a row has fewer), ties to the earliest.

    Order of a row: valid before invalid, then score descending (NaN as +inf), then position ascending; a
    lexicographic sort done as two stable sorts, least significant key first.
    """
    score_B_R = torch.where(score_B_R.isnan(), torch.full_like(score_B_R, float("inf")), score_B_R)
    by_score_B_R = torch.sort(score_B_R, dim=1, descending=True, stable=True).indices
    valid_sorted_B_R = mask_B_R.gather(1, by_score_B_R).to(torch.int8)
    order_B_R = by_score_B_R.gather(1, torch.sort(valid_sorted_B_R, dim=1, descending=True, stable=True).indices)
    keep_B_R = torch.zeros_like(mask_B_R)
    keep_B_R.scatter_(1, order_B_R[:, : min(n, mask_B_R.shape[1])], True)
    return keep_B_R & mask_B_R


def position_weights(mask_B_R: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-token loss weights that favour early tokens (``loss.position_gamma``).

        w[b, t] = 1 + gamma * (1 - t / T_b)   on valid tokens,   0 elsewhere

    where t is the 0-based response position and T_b = sum_t mask[b, t] the row's rollout length (its valid
    tokens, contiguous from position 0 in a response mask), so the first token weighs 1 + gamma and the last
    1 + gamma / T_b. gamma = 0 gives weight 1 on every valid token.

    Args:
        mask_B_R: bool (B, R), the response mask.
        gamma: >= 0.

    Returns:
        weights_B_R: float32 (B, R).
    """
    if not gamma >= 0:
        raise ValueError(f"position_weights: gamma must be >= 0, got {gamma}")
    mask_B_R = mask_B_R.bool()
    t_1_R = torch.arange(mask_B_R.shape[1], dtype=torch.float32, device=mask_B_R.device).unsqueeze(0)
    length_B1 = mask_B_R.sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
    weights_B_R = 1.0 + gamma * (1.0 - t_1_R / length_B1)
    return torch.where(mask_B_R, weights_B_R, torch.zeros_like(weights_B_R))
