"""A student and a teacher side by side: the device and dtype they run in, whether they share one id space, and
loading both.

Training (``esr.train.session``) and the analyses (``esr.analysis``) make these choices through the same functions,
so a probe sees the two models as a run does. A same-tokenizer comparison needs one id space: every token both
tokenizers know has the same id in both (one vocabulary may extend the other, as Qwen3 adds ``<think>`` after
Qwen2.5's ids); ``require_shared_vocabulary`` is the one check, raising ``ConfigError`` with what to do instead.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esr.config import Config, ConfigError
from esr.models.load import load_model, load_tokenizer

log = logging.getLogger("esr.models")

SAME_FAMILY_HINT = ("It compares the two models token by token in one id space: pick a student and a teacher from one "
                    "model family (e.g. qwen2.5-coder-0.5b-instruct <- qwen2.5-coder-1.5b-instruct).")


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; any other name as torch spells it (``cuda:1``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are ~3x slower on CPUs without bf16 instructions), bf16 on capable GPUs."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, name)


def vocabulary_mismatch(student_tok: Any, teacher_tok: Any) -> str | None:
    """Why the two tokenizers do not share one id space, or None when they do (one may extend the other)."""
    s_vocab, t_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    small, big = (s_vocab, t_vocab) if len(s_vocab) <= len(t_vocab) else (t_vocab, s_vocab)
    mismatched = next((tok for tok, i in small.items() if big.get(tok) != i), None)
    if mismatched is None:
        return None
    return f"{len(s_vocab)} vs {len(t_vocab)} tokens; e.g. {mismatched!r} has another id or is missing"


def require_shared_vocabulary(student_tok: Any, teacher_tok: Any, student: str, teacher: str, purpose: str, *,
                              hint: str = SAME_FAMILY_HINT) -> None:
    """Raise ConfigError when the tokenizers do not share one id space; ``purpose`` names what needs it (a probe,
    same-tokenizer distillation) and ``hint`` says what to do instead. Warns when one vocabulary extends the other:
    the logits are then compared on the shared ids."""
    why = vocabulary_mismatch(student_tok, teacher_tok)
    if why is not None:
        raise ConfigError(f"{purpose} needs a shared vocabulary, but student '{student}' and teacher '{teacher}' have "
                          f"different tokenizers with different vocabularies ({why}). {hint}")
    s_n, t_n = len(student_tok.get_vocab()), len(teacher_tok.get_vocab())
    if s_n != t_n:
        log.warning("the %s's vocabulary extends the other's by %d tokens; their logits are compared on the shared ids",
                    "teacher" if t_n > s_n else "student", abs(t_n - s_n))


def shared_vocab_size(student: nn.Module, teacher: nn.Module, tokenizer: Any) -> int:
    """Columns of the logits both models define; embedding matrices are often padded past the tokenizer."""
    v = min(student.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
    if len(tokenizer) > v:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but a model's output layer only {v}")
    return v


def load_frozen(spec: str, device: torch.device, dtype: torch.dtype, *, trust_remote_code: bool = False,
                allow_pickle: bool = False) -> tuple[nn.Module, Any]:
    """``load_model(spec)`` on ``device`` in ``dtype``, its parameters frozen, in eval mode (a model to read, not
    train)."""
    model, tokenizer = load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                                  allow_pickle=allow_pickle)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer


@dataclass
class Pair:
    """Student and teacher loaded from a config, sharing one tokenizer."""

    student: nn.Module
    teacher: nn.Module
    tokenizer: Any
    vocab_size: int
    """Logit columns both models define (``shared_vocab_size``)."""


def load_pair(cfg: Config, purpose: str, *, hint: str = SAME_FAMILY_HINT) -> Pair:
    """The config's student and teacher on ``train.device`` in ``train.dtype`` (no LoRA), after checking on their
    tokenizers (before any weight loads) that they share one id space."""
    s, t = cfg.student, cfg.teacher
    require_shared_vocabulary(load_tokenizer(s.name, s.trust_remote_code), load_tokenizer(t.name, t.trust_remote_code),
                              s.name, t.name, purpose, hint=hint)
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    student, tokenizer = load_model(s.name, dtype=dtype, device=device, trust_remote_code=s.trust_remote_code,
                                    allow_pickle=s.allow_pickle)
    teacher, _ = load_model(t.name, dtype=dtype, device=device, trust_remote_code=t.trust_remote_code,
                            allow_pickle=t.allow_pickle)
    return Pair(student, teacher, tokenizer, shared_vocab_size(student, teacher, tokenizer))
