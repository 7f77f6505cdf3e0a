"""What every engine that samples row by row (vLLM in-process or as a server) is asked, and how its answer becomes
``Rollouts``: the one place that fixes the sampling contract so the engines cannot drift apart.

The contract is ``HFSampler``'s (esr/rollout/sampler.py):
- row b is sampled with its own seed ``row_seed(seed, row_ids[b])``, so its tokens do not depend on the other rows
  (vLLM: a per-request ``seed``, which gives the request its own generator);
- temperature and top-p only: no top-k, min-p or repetition penalty of the engine's or the model's own (vLLM must
  be built with ``generation_config="vllm"`` so a hub model's defaults are not applied);
- the row stops at the first of the run's EOS ids (``esr.rollout.eos``), which is kept; the engine's own idea of
  EOS is switched off (``ignore_eos``) so both engines stop on exactly the same ids; at most the horizon's tokens;
  ``min_new_tokens`` forbids EOS before that many tokens;
- log-probs are the engine's of the sampled token under the untempered distribution (vLLM's ``raw_logprobs``),
  which is what the trainer's forward computes: their difference is the on-policy health metric.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from esr.rollout.sampler import build_rollouts, left_pad, row_seed
from esr.types import Rollouts


@dataclass(frozen=True)
class RowRequest:
    """One row's sampling request, engine-neutral."""

    prompt_ids: tuple[int, ...]
    seed: int
    """``row_seed(seed, row_id)``: this row's own stream (< 2**63)."""
    max_tokens: int
    min_tokens: int
    temperature: float
    top_p: float
    stop_token_ids: tuple[int, ...]


def row_requests(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *, seed: int,
                 row_ids: Sequence[int] | None, eos_token_ids: Sequence[int], temperature: float, top_p: float,
                 min_new_tokens: int) -> list[RowRequest]:
    """One ``RowRequest`` per prompt (``row_ids[b]``, default b, keys row b's seed)."""
    row_ids = list(range(len(prompt_ids))) if row_ids is None else list(row_ids)
    if len(row_ids) != len(prompt_ids):
        raise ValueError(f"sample: {len(row_ids)} row ids for {len(prompt_ids)} prompts")
    return [RowRequest(prompt_ids=tuple(int(t) for t in p), seed=row_seed(seed, r), max_tokens=max_new_tokens,
                       min_tokens=min(min_new_tokens, max_new_tokens), temperature=temperature, top_p=top_p,
                       stop_token_ids=tuple(eos_token_ids))
            for p, r in zip(prompt_ids, row_ids, strict=True)]


def rollouts_from_rows(prompt_ids: Sequence[Sequence[int]], tokens: Sequence[Sequence[int]],
                       logprobs: Sequence[Sequence[float]] | None, *, eos_token_ids: Sequence[int], pad_token_id: int,
                       horizon: int, pad_to: int = 0) -> Rollouts:
    """Rows of sampled tokens (each ending at its first EOS or at the horizon) as ``Rollouts``: prompts left-padded
    to max(longest, ``pad_to``) columns, responses right-padded to the longest, the mask built by
    ``build_rollouts`` exactly as for ``HFSampler``'s output; ``logprobs`` (the engine's, per row) are 0 on padding.
    """
    for b, row in enumerate(tokens):
        if len(row) > horizon:
            raise ValueError(f"row {b}: the engine returned {len(row)} tokens for a horizon of {horizon}")
    ids_B_P, mask_B_P = left_pad(prompt_ids, pad_token_id)
    if pad_to > ids_B_P.shape[1]:
        extra = pad_to - ids_B_P.shape[1]
        ids_B_P = torch.nn.functional.pad(ids_B_P, (extra, 0), value=pad_token_id)
        mask_B_P = torch.nn.functional.pad(mask_B_P, (extra, 0), value=0)
    R = max((len(row) for row in tokens), default=0)
    new_B_R = torch.full((len(tokens), R), pad_token_id, dtype=torch.long)
    logp_B_R = torch.zeros((len(tokens), R), dtype=torch.float32)
    for b, row in enumerate(tokens):
        new_B_R[b, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        if logprobs is not None:
            if len(logprobs[b]) != len(row):
                raise ValueError(f"row {b}: {len(logprobs[b])} log-probs for {len(row)} tokens")
            logp_B_R[b, : len(row)] = torch.tensor(list(logprobs[b]), dtype=torch.float32)
    rollouts = build_rollouts(ids_B_P, mask_B_P, new_B_R, eos_token_ids, horizon)
    if logprobs is None:
        return rollouts
    return dataclasses.replace(rollouts, logprobs_B_R=torch.where(rollouts.response_mask_B_R, logp_B_R, 0.0))
