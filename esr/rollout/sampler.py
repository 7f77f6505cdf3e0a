"""Batched student sampling with a KV cache (Hugging Face ``generate``), seeded per step.

On-policy distillation needs samples from the student's own (tempered) distribution, so the sampler builds its own
``GenerationConfig`` instead of inheriting a model's defaults: a hub model's ``top_k=20`` or
``repetition_penalty=1.1`` would silently make the rollouts off-policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from transformers import GenerationConfig, PreTrainedModel

from esr.types import Rollouts


class Sampler(Protocol):
    def sample(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *, seed: int) -> Rollouts:
        """Sample one response per prompt, at most ``max_new_tokens`` tokens, stopping each row at EOS."""
        ...


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to (B, P) ids and attention mask, so every response starts at column P."""
    P = max(len(p) for p in prompt_ids)
    ids_B_P = torch.full((len(prompt_ids), P), pad_token_id, dtype=torch.long)
    mask_B_P = torch.zeros((len(prompt_ids), P), dtype=torch.long)
    for b, p in enumerate(prompt_ids):
        if len(p):
            ids_B_P[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask_B_P[b, P - len(p) :] = 1
    return ids_B_P, mask_B_P


def build_rollouts(
    prompt_ids_B_P: torch.Tensor,
    prompt_mask_B_P: torch.Tensor,
    new_tokens_B_R: torch.Tensor,
    eos_token_ids: Sequence[int],
    horizon: int,
) -> Rollouts:
    """Turn ``generate``'s padded output into Rollouts with an EOS-aware response mask.

    A row's response is every token up to and including its first EOS; a row without EOS is cut by the horizon and
    keeps all its tokens. What follows the first EOS is padding (which may itself be EOS when pad == eos).
    """
    B, R = new_tokens_B_R.shape
    is_eos_B_R = torch.isin(new_tokens_B_R, torch.tensor(list(eos_token_ids), dtype=new_tokens_B_R.dtype))
    has_eos_B = is_eos_B_R.any(dim=1)
    first_eos_B = torch.where(has_eos_B, is_eos_B_R.int().argmax(dim=1), torch.full((B,), R))
    length_B = torch.where(has_eos_B, first_eos_B + 1, torch.full((B,), R))
    response_mask_B_R = torch.arange(R).unsqueeze(0) < length_B.unsqueeze(1)
    return Rollouts(
        input_ids_B_L=torch.cat([prompt_ids_B_P, new_tokens_B_R], dim=1),
        attention_mask_B_L=torch.cat([prompt_mask_B_P, response_mask_B_R.long()], dim=1),
        response_mask_B_R=response_mask_B_R,
        prompt_len=prompt_ids_B_P.shape[1],
        horizon=horizon,
        cut_B=~has_eos_B,
    )


class HFSampler:
    """Samples with ``model.generate`` (KV cache), in chunks of ``batch_size`` rows (None: all rows at once)."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        temperature: float = 0.7,
        top_p: float = 1.0,
        min_new_tokens: int = 0,
        batch_size: int | None = None,
    ) -> None:
        self.model = model
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.temperature = temperature
        self.top_p = top_p
        self.min_new_tokens = min_new_tokens
        self.batch_size = batch_size

    def generation_config(self, max_new_tokens: int) -> GenerationConfig:
        """Sampling at ``temperature`` (top-k off, top-p as set); greedy decoding when the temperature is 0."""
        sampling = self.temperature > 0
        return GenerationConfig(
            do_sample=sampling,
            temperature=self.temperature if sampling else 1.0,
            top_p=self.top_p if sampling else 1.0,
            top_k=0 if sampling else None,  # 0 disables top-k: sample from the full (tempered) distribution
            repetition_penalty=1.0,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min(self.min_new_tokens, max_new_tokens),
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )

    @torch.no_grad()
    def sample(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *, seed: int) -> Rollouts:
        device = next(self.model.parameters()).device
        ids_B_P, mask_B_P = left_pad(prompt_ids, self.pad_token_id)
        chunk = self.batch_size or len(prompt_ids)
        gen_config = self.generation_config(max_new_tokens)
        was_training = self.model.training
        self.model.eval()
        pieces: list[torch.Tensor] = []
        # Seeding here (not once per run) makes each step's samples a function of (seed, step): resume-exact.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(prompt_ids), chunk):
                out_B_L = self.model.generate(
                    input_ids=ids_B_P[start : start + chunk].to(device),
                    attention_mask=mask_B_P[start : start + chunk].to(device),
                    generation_config=gen_config,
                )
                pieces.append(out_B_L[:, ids_B_P.shape[1] :].cpu())
        self.model.train(was_training)
        R = max(p.shape[1] for p in pieces)
        new_B_R = torch.cat([torch.nn.functional.pad(p, (0, R - p.shape[1]), value=self.pad_token_id) for p in pieces])
        return build_rollouts(ids_B_P, mask_B_P, new_B_R, self.eos_token_ids, max_new_tokens)
