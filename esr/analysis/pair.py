"""The student-teacher pair the probes (kl-profile, decay) load from a config, and what they share around it.

The probes compare the two models token by token in one id space, so ``load_pair`` checks first that both
tokenizers agree (``require_shared_vocabulary``); a cross-tokenizer pair is refused with a message naming a pair
that works. The models load on ``train.device`` in ``train.dtype``, without LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from esr.config import Config, ConfigError, load_config


def progress_bar(enabled: bool) -> Progress:
    """The rich progress bar the probes show (disabled: prints nothing)."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), disable=not enabled, transient=False)



@dataclass
class Pair:
    """Student and teacher loaded from a config, sharing one tokenizer."""

    student: nn.Module
    teacher: nn.Module
    tokenizer: Any
    vocab_size: int


def require_shared_vocabulary(student_tok: Any, teacher_tok: Any, student: str, teacher: str, probe: str) -> None:
    """Raise ConfigError when the two tokenizers do not share one id space (the probes compare ids position by
    position, which a cross-tokenizer pair cannot do)."""
    from esr.train.session import vocabulary_mismatch

    why = vocabulary_mismatch(student_tok, teacher_tok)
    if why is not None:
        raise ConfigError(
            f"{probe} needs a shared vocabulary: it compares student and teacher token by token in one id space, but "
            f"student '{student}' and teacher '{teacher}' have different tokenizers ({why}). Profile a pair from one "
            f"model family (e.g. qwen2.5-coder-0.5b-instruct <- qwen2.5-coder-1.5b-instruct).")


def as_config(config: str | Path | Config) -> Config:
    """A Config from a YAML path or a Config."""
    return config if isinstance(config, Config) else load_config(config)


def load_pair(cfg: Config, probe: str) -> Pair:
    """Load student and teacher on ``train.device`` in ``train.dtype`` (no LoRA), checking the tokenizers first."""
    from esr.models import load_model, load_tokenizer
    from esr.train.session import resolve_device, resolve_dtype, shared_vocab_size

    s, t = cfg.student, cfg.teacher
    require_shared_vocabulary(load_tokenizer(s.name, s.trust_remote_code), load_tokenizer(t.name, t.trust_remote_code),
                              s.name, t.name, probe)
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    student, tokenizer = load_model(s.name, dtype=dtype, device=device, trust_remote_code=s.trust_remote_code,
                                    allow_pickle=s.allow_pickle)
    teacher, _ = load_model(t.name, dtype=dtype, device=device, trust_remote_code=t.trust_remote_code,
                            allow_pickle=t.allow_pickle)
    return Pair(student, teacher, tokenizer, shared_vocab_size(student, teacher, tokenizer))
