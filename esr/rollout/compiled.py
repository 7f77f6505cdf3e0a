"""``rollout.engine=hf-compiled``: ``HFSampler`` decoding with a static KV cache and a compiled decode forward.

A GPU decode path for machines without vLLM. Sampling is ``HFSampler``'s, unchanged (the same ``RowSampling``
processor, so row b's tokens are a function of (seed, row id, prompt) only, the same tokens ``hf`` draws up to the
rounding of the logits); what changes is how ``generate`` runs the model:

- ``cache_implementation="static"``: the KV cache is preallocated as (rows, heads, max_cache_len, head size)
  tensors, so every decode step has the same shapes and the same tensor addresses;
- Hugging Face ``generate`` then compiles the decode forward (not the prefill) with ``torch.compile``: on CUDA mode
  ``reduce-overhead`` (CUDA graphs: one graph launch per token instead of hundreds of kernel launches); on a CPU
  no compilation by default (``compile=True`` forces inductor's ``default`` mode; benchmarks/rollout_dtype.py
  measures both).

Recompiles. A compiled graph is specialised to the decode shapes: the number of rows and ``max_cache_len``. To keep
them few, prompts are left-padded to a multiple of ``prompt_bucket`` columns (64) and ``max_cache_len`` is that
plus the horizon, and a chunk of rows is padded to ``batch_size`` rows (``rollout.batch_size``; None: the next
power of two) with copies of its first row (same prompt, same row id: they end when it ends, and are dropped).
A run with a fixed horizon (ESR's N) thus compiles once per prompt bucket it meets (a handful), and a horizon that
changes every step (``rollout.horizon=progressive``) compiles once per (bucket, horizon). Dynamo's own limit
(``torch._dynamo.config.cache_size_limit``, 8 by default) then falls back to eager for further shapes, with a
warning. The static cache is kept between calls and reallocated when the row count changes or a longer cache is
needed; refreshing the weights (``sync_weights``) writes in place, so captured CUDA graphs stay valid.

``rollout.dtype`` works as for ``hf``: ``auto`` compiles the trainer's own module; another dtype samples with (and
compiles) a ``SamplingCopy`` refreshed every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import CompileConfig, GenerationConfig, PreTrainedModel

from esr.config import RolloutConfig
from esr.rollout.sampler import HFSampler
from esr.rollout.sampling_copy import sampling_copy_for

if TYPE_CHECKING:
    from esr.rollout.context import EngineContext


def bucket(n: int, size: int) -> int:
    """``n`` rounded up to a multiple of ``size`` (at least ``size``)."""
    return max(size, -(-n // size) * size)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class CompiledHFSampler(HFSampler):
    """``HFSampler`` with a static KV cache and a compiled decode step (module docstring)."""

    def __init__(self, model: PreTrainedModel, cfg: RolloutConfig, *, eos_token_ids: Sequence[int], pad_token_id: int,
                 context: EngineContext | None = None, compile: bool | None = None,
                 prompt_bucket: int = 64) -> None:
        super().__init__(model, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, temperature=cfg.temperature,
                         top_p=cfg.top_p, min_new_tokens=cfg.min_new_tokens, batch_size=cfg.batch_size,
                         sampling_copy=sampling_copy_for(cfg, model, context and context.train_dtype))
        self.context = context
        device = next(self.model.parameters()).device
        self.compile = device.type == "cuda" if compile is None else compile
        """Compile the decode forward: on CUDA by default, on a CPU only when asked."""
        self.mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.prompt_bucket = prompt_bucket

    def generation_config(self, max_new_tokens: int, prompt_len: int = 0) -> GenerationConfig:
        """``HFSampler``'s, with a static cache of ``prompt_len + max_new_tokens`` positions and the compile
        settings (``dynamic=False``: one graph per shape, see the module docstring)."""
        gen = super().generation_config(max_new_tokens, prompt_len)
        gen.cache_implementation = "static"
        gen.max_cache_len = prompt_len + max_new_tokens
        gen.disable_compile = not self.compile
        if self.compile:
            gen.compile_config = CompileConfig(fullgraph=False, dynamic=False, mode=self.mode)
            gen.compile_config._compile_all_devices = True  # HF compiles only on accelerators unless told
        return gen

    def padded_prompts(self, prompt_ids: Sequence[Sequence[int]], pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded to a multiple of ``prompt_bucket`` columns (at least ``pad_to``): few cache lengths."""
        longest = max(max(len(p) for p in prompt_ids), pad_to)
        return super().padded_prompts(prompt_ids, bucket(longest, self.prompt_bucket))

    def generate_rows(self, ids_B_P: torch.Tensor, mask_B_P: torch.Tensor, rows: Sequence[int], seed: int,
                      gen_config: GenerationConfig) -> torch.Tensor:
        """``HFSampler.generate_rows`` on the chunk padded to a fixed row count with copies of its first row
        (same prompt and row id, so they sample what it samples and stop with it); their tokens are dropped."""
        B = ids_B_P.shape[0]
        extra = (self.batch_size or next_power_of_two(B)) - B
        if extra <= 0:
            return super().generate_rows(ids_B_P, mask_B_P, rows, seed, gen_config)
        ids = torch.cat([ids_B_P, ids_B_P[:1].expand(extra, -1)])
        mask = torch.cat([mask_B_P, mask_B_P[:1].expand(extra, -1)])
        return super().generate_rows(ids, mask, [*rows, *[rows[0]] * extra], seed, gen_config)[:B]
