"""Everything a run needs before its first step: models on a device, the tokenizer contract, prompts, optimizer.

The checks here turn the mistakes OPD users hit most (teacher/student vocabulary mismatch, pad == eos, missing EOS
ids of a chat model's end of turn) into decisions made once, visibly, before any compute is spent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esr.config import Config, ConfigError
from esr.data import has_chat_template, load_prompts, tokenize_prompts
from esr.data.order import batch_indices  # noqa: F401  (re-exported: the loop and benchmarks use it here)
from esr.models import apply_lora, load_model
from esr.models.pair import (
    require_shared_vocabulary,
    resolve_device,
    resolve_dtype,
    shared_vocab_size,
    vocabulary_mismatch,
)
from esr.rollout.eos import eos_token_ids
from esr.rollout.policies import HorizonPolicy, make_policy
from esr.rollout.sampler import HFSampler
from esr.teacher.cross import CrossTokenizer, template_warnings
from esr.teacher.score import TeacherScorer
from esr.train.remote_teacher import RemoteScorer, connect_remote_teacher

log = logging.getLogger("esr.train")

CROSS_TOKENIZER_HINT = ("Distil across tokenizers with loss.cross_tokenizer=aligned-exact (the paper's: KL on tokens "
                        "both tokenizers cut the same way) or loss.cross_tokenizer=span-sampled (every aligned span, "
                        "sampled).")


@dataclass
class Session:
    student: nn.Module
    teacher: nn.Module | None
    """None when the teacher is a server (``teacher.url``): then ``scorer`` is a ``RemoteScorer``."""
    tokenizer: Any
    sampler: HFSampler
    scorer: TeacherScorer | RemoteScorer
    policy: HorizonPolicy
    prompt_ids: tuple[tuple[int, ...], ...]
    vocab_size: int
    """Logit columns of the student (same-tokenizer: the columns both models share)."""
    cross: CrossTokenizer | None
    """Set when the teacher has another tokenizer: re-renders and aligns every batch for it."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    info: dict[str, Any]
    """Facts recorded in run.json: parameter counts, prompt counts, eos ids, device, dtype."""


def prompt_budget(cfg: Config, *models: nn.Module) -> int:
    """Most prompt tokens a run takes: ``data.max_prompt_tokens``, lowered so that a prompt plus
    ``rollout.max_new_tokens`` fits every model's context window. Positions past it were never trained (or do not
    exist, with learned position embeddings), so such prompts are dropped and counted like any too-long prompt."""
    budget = cfg.data.max_prompt_tokens
    windows = [getattr(getattr(m, "config", None), "max_position_embeddings", None) for m in models]
    window = min((w for w in windows if isinstance(w, int)), default=None)
    if window is None:
        return budget
    room = window - cfg.rollout.max_new_tokens
    if room < 1:
        raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt in the "
                          f"models' context window of {window} tokens; lower rollout.max_new_tokens")
    if room < budget:
        log.warning("prompts are capped at %d tokens (context window %d - rollout.max_new_tokens %d), below "
                    "data.max_prompt_tokens=%d", room, window, cfg.rollout.max_new_tokens, budget)
    return min(budget, room)


def build_session(cfg: Config) -> Session:
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    # teacher.url: the teacher is a server (esr/train/remote_teacher.py), reached before any model loads.
    remote = connect_remote_teacher(cfg) if getattr(cfg.teacher, "url", None) is not None else None
    student, tokenizer = load_model(cfg.student.name, dtype=dtype, device=device,
                                    trust_remote_code=cfg.student.trust_remote_code,
                                    allow_pickle=cfg.student.allow_pickle)
    if remote is None:
        teacher, teacher_tok = load_model(cfg.teacher.name, dtype=dtype, device=device,
                                          trust_remote_code=cfg.teacher.trust_remote_code,
                                          allow_pickle=cfg.teacher.allow_pickle)
    else:  # check_student compares the server's tokenizer with the student's
        teacher, teacher_tok = None, tokenizer
    cross_mode = cfg.loss.cross_tokenizer if vocabulary_mismatch(tokenizer, teacher_tok) else None
    if cross_mode is None:
        if cfg.loss.cross_tokenizer is not None:
            log.info("student and teacher share one vocabulary: loss.cross_tokenizer is ignored (same-tokenizer path)")
        require_shared_vocabulary(tokenizer, teacher_tok, cfg.student.name, cfg.teacher.name,
                                  "same-tokenizer distillation", hint=CROSS_TOKENIZER_HINT)
        vocab_size = teacher_vocab_size = (shared_vocab_size(student, teacher, tokenizer) if remote is None
                                           else remote.check_student(tokenizer, student, cfg))
    else:
        vocab_size = student.get_output_embeddings().weight.shape[0]
        teacher_vocab_size = teacher.get_output_embeddings().weight.shape[0]
    eos_ids = eos_token_ids(tokenizer, student)
    pad_id = tokenizer.pad_token_id  # load_model guarantees one (eos when the tokenizer had none)

    if not has_chat_template(tokenizer):
        log.warning("student '%s' has no chat template: prompts use the plain 'Question: ... Answer:' template, "
                    "which suits a base model; a chat model that lost its template would be trained off-format",
                    cfg.student.name)
    prompt_set = load_prompts(cfg.data)
    tokenized = tokenize_prompts(prompt_set.prompts, tokenizer,
                                 prompt_budget(cfg, student, *([teacher] if teacher is not None else [])))
    cross = None
    if cross_mode is not None:
        for warning in template_warnings(tokenizer, teacher_tok, cfg.student.name, cfg.teacher.name):
            log.warning(warning)
        teacher_prompts = tokenize_prompts(tokenized.prompts, teacher_tok, max_tokens=1 << 30)
        assert len(teacher_prompts.ids) == len(tokenized.ids), "the teacher dropped prompts the student kept"
        cross = CrossTokenizer(tokenizer, teacher_tok, student_size=vocab_size, teacher_size=teacher_vocab_size,
                               student_eos_ids=eos_ids, teacher_prompt_ids=teacher_prompts.ids)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are random: the seed makes a run (and its resume) repeatable
    student = _make_trainable(student, cfg)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(student, cfg)
    r = cfg.rollout
    sampler = HFSampler(
        student, eos_token_ids=eos_ids, pad_token_id=pad_id, temperature=r.temperature, top_p=r.top_p,
        min_new_tokens=r.min_new_tokens, batch_size=r.batch_size,
    )
    info = {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "student_params": sum(p.numel() for p in student.parameters()),
        "trainable_params": sum(p.numel() for p in params),
        "teacher_params": sum(p.numel() for p in teacher.parameters()) if teacher is not None else remote.params,
        **({"teacher": remote.describe()} if remote is not None else {}),
        "eos_token_ids": eos_ids, "pad_token_id": pad_id, "pad_is_eos": pad_id in eos_ids, "vocab_size": vocab_size,
        "cross_tokenizer": cross_mode,
        **({"shared_vocab": len(cross.vocab_map), "teacher_vocab_size": teacher_vocab_size,
            "teacher_stop_id": cross.teacher_stop} if cross is not None else {}),
        "prompts": len(tokenized.ids), "data_rows": prompt_set.n_rows, "data_skipped": prompt_set.n_skipped,
        "prompts_too_long": tokenized.n_too_long,
    }
    return Session(
        student=student, teacher=teacher, tokenizer=tokenizer, sampler=sampler,
        scorer=TeacherScorer(teacher, vocab_size=teacher_vocab_size) if remote is None else remote,
        policy=make_policy(cfg.rollout), cross=cross,
        prompt_ids=tokenized.ids, vocab_size=vocab_size, optimizer=optimizer, scheduler=scheduler, device=device,
        info=info,
    )


def make_optimizer(student: nn.Module, cfg: Config) -> tuple[torch.optim.Optimizer,
                                                              torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the student's trainable parameters, with a linear warm-up over ``train.warmup_steps``."""
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    warmup = cfg.train.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler


def _make_trainable(student: nn.Module, cfg: Config) -> nn.Module:
    if cfg.train.finetune == "lora":
        lc = cfg.lora
        student = apply_lora(student, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, targets=lc.targets)
    else:
        for p in student.parameters():
            p.requires_grad_(True)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads hacks.
        # transformers 5 names it activation checkpointing (the old name warns); 4.x has only the old name.
        if hasattr(student, "activation_checkpointing_enable"):
            student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    return student
