"""Score token sequences with a causal LM: per-token log-probs of the given tokens, top-k, ranks (no HTTP here).

For a sequence ``x_0 .. x_{L-1}`` and a start position ``s`` (1 <= s <= L), the scores are, for j = s .. L-1,

    logprob[j - s] = log p(x_j | x_<j) = logits_{j-1}[x_j] - logsumexp_v logits_{j-1}[v]

at temperature 1 (untempered), normalised over the model's whole output layer (``vocab_size`` columns). Only the
L - s positions that predict scored tokens are projected to the vocabulary: the decoder body runs over the whole
sequence (``esr.models.forward`` does the same for rollouts), then the head runs on those hidden states, a few
hundred positions at a time, so a B x L x V logits tensor never exists.

Sequences are grouped into micro-batches of at most ``max_batch_tokens`` padded tokens (longest first), right-padded
with an attention mask; causal attention means padding on the right never changes a real position's result.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from esr.models.forward import head_logits

HEAD_CHUNK_FLOATS = 1 << 24
"""Floats in one chunk of projected logits (64 MiB in float32): positions per chunk = this // vocab_size."""


@dataclass(frozen=True)
class SequenceScores:
    """The scores of one sequence from its start position on (n = L - start positions), on the CPU."""

    logprobs: torch.Tensor
    """(n,) float32: log p(x_j | x_<j) for j = start .. L-1."""
    top_ids: torch.Tensor
    """(n, k) int64: the k most likely tokens at each of those positions, most likely first."""
    top_logprobs: torch.Tensor
    """(n, k) float32: their log-probs."""
    ranks: torch.Tensor | None = None
    """(n,) int64: rank of x_j among all tokens (1 = most likely; ties count against it), when asked for."""
    next_id: int | None = None
    """The most likely token after the whole sequence, when asked for (``predict_next``)."""


def plan_micro_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Group sequence indices, longest first, so that rows x longest length <= ``max_batch_tokens`` per group.

    A sequence longer than ``max_batch_tokens`` gets a group of its own (callers reject those beforehand).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]  # sorted: the first member is the longest
        if current and (len(current) + 1) * longest > max_batch_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


def model_vocab_size(model: nn.Module) -> int:
    """Columns of the model's logits: rows of its output layer (often padded past the tokenizer's length)."""
    return int(model.get_output_embeddings().weight.shape[0])


@torch.no_grad()
def score_sequences(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    *,
    top_k: int = 0,
    vocab_size: int | None = None,
    max_batch_tokens: int = 8192,
    with_ranks: bool = False,
    predict_next: bool = False,
) -> list[SequenceScores]:
    """Score every sequence from its start on (see the module docstring); inputs must already be valid.

    Args:
        model: a causal LM with ``get_decoder()`` and an output layer (eval mode; gradients are not tracked).
        sequences: token ids, each non-empty and in [0, vocab_size).
        starts: per sequence, the first position whose token is scored, 1 <= start <= len(sequence).
        top_k: also return the k most likely tokens at each scored position (0: none).
        vocab_size: normalise over the first V logit columns (default: all of them).
        max_batch_tokens: padded tokens per forward pass (rows x longest row).
        with_ranks: also return each scored token's rank.
        predict_next: also return the most likely token after each whole sequence (greedy, one step).

    Returns:
        One ``SequenceScores`` per sequence, in the order given.
    """
    V = vocab_size or model_vocab_size(model)
    device = next(model.parameters()).device
    decoder = model.get_decoder()
    results: list[SequenceScores | None] = [None] * len(sequences)
    for group in plan_micro_batches([len(s) for s in sequences], max_batch_tokens):
        rows = [sequences[i] for i in group]
        ids_B_T, mask_B_T = _padded(rows)
        pos_B_T = torch.arange(ids_B_T.shape[1]).unsqueeze(0).expand_as(ids_B_T)
        hidden_B_T_H = decoder(
            input_ids=ids_B_T.to(device), attention_mask=mask_B_T.to(device), position_ids=pos_B_T.to(device),
            use_cache=False,
        ).last_hidden_state
        # Column j - 1 predicts token j: keep columns start-1 .. L-2 of every row, then project them together.
        hidden_N_H = torch.cat([hidden_B_T_H[row, starts[i] - 1 : len(sequences[i]) - 1]
                                for row, i in enumerate(group)])
        targets_N = torch.cat([ids_B_T[row, starts[i] : len(sequences[i])] for row, i in enumerate(group)])
        logp_N, top_ids_N_K, top_logp_N_K, ranks_N = _project(model, hidden_N_H, targets_N.to(device), V, top_k,
                                                               with_ranks)
        next_ids = None
        if predict_next:
            last_B_H = hidden_B_T_H[torch.arange(len(group)), torch.tensor([len(row) - 1 for row in rows])]
            next_ids = head_logits(model, last_B_H.unsqueeze(0), V)[0].argmax(dim=-1).tolist()
        offset = 0
        for row, i in enumerate(group):
            piece = slice(offset, offset + len(sequences[i]) - starts[i])
            results[i] = SequenceScores(
                logprobs=logp_N[piece], top_ids=top_ids_N_K[piece], top_logprobs=top_logp_N_K[piece],
                ranks=ranks_N[piece] if ranks_N is not None else None,
                next_id=next_ids[row] if next_ids is not None else None,
            )
            offset = piece.stop
    return [r for r in results if r is not None]


def _padded(rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids right-padded with 0 to the longest row, and the attention mask (1 on real tokens): (B, T) each."""
    T = max(len(row) for row in rows)
    ids_B_T = torch.zeros((len(rows), T), dtype=torch.long)
    mask_B_T = torch.zeros((len(rows), T), dtype=torch.long)
    for b, row in enumerate(rows):
        ids_B_T[b, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        mask_B_T[b, : len(row)] = 1
    return ids_B_T, mask_B_T


def _project(
    model: nn.Module, hidden_N_H: torch.Tensor, targets_N: torch.Tensor, V: int, top_k: int, with_ranks: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Head + log-softmax over chunks of positions; returns CPU tensors (logp, top ids, top logp, ranks)."""
    N = hidden_N_H.shape[0]
    chunk = max(1, HEAD_CHUNK_FLOATS // V)
    logp, top_ids, top_logp, ranks = [], [], [], []
    for a in range(0, N, chunk):
        logp_C_V = torch.log_softmax(head_logits(model, hidden_N_H[a : a + chunk].unsqueeze(0), V)[0], dim=-1)
        picked_C = logp_C_V.gather(-1, targets_N[a : a + chunk].unsqueeze(-1)).squeeze(-1)
        logp.append(picked_C.cpu())
        if top_k:
            values, indices = torch.topk(logp_C_V, top_k, dim=-1)
            top_logp.append(values.cpu())
            top_ids.append(indices.cpu())
        if with_ranks:
            ranks.append((logp_C_V >= picked_C.unsqueeze(-1)).sum(dim=-1).cpu())
    # Without chunks either N or top_k is 0, so (N, top_k) is the right empty shape.
    return (
        torch.cat(logp) if logp else torch.zeros(0),
        torch.cat(top_ids) if top_ids else torch.zeros((N, top_k), dtype=torch.long),
        torch.cat(top_logp) if top_logp else torch.zeros((N, top_k)),
        (torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)) if with_ranks else None,
    )
