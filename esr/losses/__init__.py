"""Losses for on-policy distillation: pure tensor functions, formula and shapes in each docstring.

- ``divergences``: exact full-vocabulary ``reverse_kl`` (default), ``forward_kl``, ``jsd`` per position.
- ``sampled``: sampled-token estimator (``token_logprobs``, ``sampled_advantage``, ``sampled_pg_loss``).
- ``topk``: ``topk_reverse_kl``, reverse KL over the teacher's top-k tokens plus one tail bucket (``loss.kind=topk``).
- ``reduce``: ``masked_mean`` / ``masked_sum`` and ``token_mean_over_batch`` for exact gradient accumulation.
- ``select``: which tokens get loss (``select_tokens``, ``loss.select``), ``position_weights`` and ``entropy``.

``DIVERGENCES`` maps a ``loss.kind`` name to its function; every entry is called as ``fn(student_logits_B_T_V,
teacher_logits_B_T_V)`` except ``jsd``, which also takes ``beta``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from esr.losses.divergences import forward_kl, jsd, reverse_kl
from esr.losses.reduce import masked_mean, masked_sum, token_mean_over_batch
from esr.losses.sampled import sampled_advantage, sampled_pg_loss, token_logprobs
from esr.losses.select import SCORE_SELECTORS, SELECTORS, entropy, needed_scores, position_weights, select_tokens
from esr.losses.topk import mask_top_columns, topk_reverse_kl

DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "reverse_kl": reverse_kl,
    "forward_kl": forward_kl,
    "jsd": jsd,
}

__all__ = [
    "DIVERGENCES",
    "SCORE_SELECTORS",
    "SELECTORS",
    "entropy",
    "forward_kl",
    "jsd",
    "mask_top_columns",
    "masked_mean",
    "masked_sum",
    "needed_scores",
    "position_weights",
    "reverse_kl",
    "sampled_advantage",
    "sampled_pg_loss",
    "select_tokens",
    "token_logprobs",
    "token_mean_over_batch",
    "topk_reverse_kl",
]
