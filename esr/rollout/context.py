"""What a rollout engine with its own copy of the student needs to know beyond ``rollout``'s settings
(``EngineContext``), and the dtype it samples in. Apart from ``esr.rollout.engine`` so the engines can import it
without importing the factory that imports them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esr.config import RolloutConfig


@dataclass(frozen=True)
class EngineContext:
    """What an engine with its own copy of the student needs beyond ``rollout``'s settings."""

    source: str
    """The student's weights as a folder (or hub id) the engine loads (``esr.models.load.resolvable_base``)."""
    finetune: str
    """``train.finetune``: ``lora`` (sync adapters) or ``full`` (sync every weight)."""
    lora_rank: int
    """``lora.r``: the largest adapter rank the engine must accept."""
    train_dtype: torch.dtype
    """The trainer's dtype (``rollout.dtype=auto`` samples in it)."""
    max_model_len: int
    """Longest prompt plus ``rollout.max_new_tokens`` (``rollout.vllm.max_model_len`` overrides it)."""
    seed: int = 0


def sample_dtype(cfg: RolloutConfig, train_dtype: torch.dtype) -> torch.dtype:
    """``rollout.dtype``: ``auto`` is the trainer's dtype."""
    return {"auto": train_dtype, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
