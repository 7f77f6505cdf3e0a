"""Everything a run needs before its first step: models on a device, the tokenizer contract, prompts, the teacher
scorer and the rollout sampler (the two engine seams, picked here once), the trainable student and its optimizer.

The checks here turn the mistakes OPD users hit most (teacher/student vocabulary mismatch, pad == eos, missing EOS
ids of a chat model's end of turn) into decisions made once, visibly, before any compute is spent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from esr.config import Config, ConfigError
from esr.data import has_chat_template, load_prompts, tokenize_prompts
from esr.data.mix import MixPrompts, load_mix
from esr.data.order import batch_indices  # noqa: F401  (re-exported: the loop and benchmarks use it here)
from esr.data.sources import PromptSet
from esr.data.template import TokenizedPrompts
from esr.models import apply_lora, load_model
from esr.models.load import load_tokenizer, resolvable_base
from esr.models.pair import (
    require_shared_vocabulary,
    resolve_device,
    resolve_dtype,
    shared_vocab_size,
    vocabulary_mismatch,
)
from esr.rollout.context import EngineContext, sample_dtype
from esr.rollout.engine import Sampler, make_sampler
from esr.rollout.eos import eos_token_ids
from esr.rollout.policies import HorizonPolicy, make_policy
from esr.teacher.cross import CrossTokenizer, template_warnings
from esr.teacher.cross_score import CrossScorer
from esr.teacher.score import LocalScorer
from esr.teacher.scorer import TeacherScorer, check_supported
from esr.teacher.vllm_score import VLLMScorer
from esr.train.remote_teacher import RemoteScorer, connect_remote_teacher
from esr.train.route import Route, make_route, teacher_configs
from esr.train.samples import make_teacher_sampler

log = logging.getLogger("esr.train")

CROSS_TOKENIZER_HINT = ("Distil across tokenizers with loss.cross_tokenizer=aligned-exact (the paper's: KL on tokens "
                        "both tokenizers cut the same way) or loss.cross_tokenizer=span-sampled (every aligned span, "
                        "sampled).")


@dataclass
class Session:
    student: nn.Module
    teacher: nn.Module | None
    """None when the teacher is a server (``teacher.url``: ``scorer`` is a ``RemoteScorer``) or in an in-process vLLM
    engine (``teacher.engine=vllm``: a ``VLLMScorer``)."""
    tokenizer: Any
    sampler: Sampler
    """The rollout engine (``rollout.engine``; ``esr.rollout.engine``)."""
    scorer: TeacherScorer
    """The teacher engine: ``LocalScorer``, ``CrossScorer``, ``RemoteScorer`` or ``VLLMScorer``
    (``esr.teacher.scorer``); the loop closes it when the run ends."""
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
    teacher_sampler: Sampler | None = None
    """Samples the teacher's share of the rows (``rollout.teacher_share`` > 0; esr/train/samples.py), else None."""
    route: Route | None = None
    """With ``data.mix``: each source's prompts, weight and scorer (``esr.train.route``); None for one source."""


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


class Vocabularies(NamedTuple):
    """How the two models' token ids relate, decided once."""

    cross_mode: str | None
    """``loss.cross_tokenizer`` when the vocabularies differ, else None (one id space)."""
    vocab_size: int
    """The student's logit columns the loss uses (same tokenizer: those both models define)."""
    teacher_vocab_size: int
    """The teacher's logit columns (same tokenizer: ``vocab_size``)."""


def build_session(cfg: Config) -> Session:
    """The run's session (module docstring). A config the models or the teacher cannot serve raises here,
    before the caller creates a run folder. With ``data.mix``: one scorer per distinct teacher of the mix
    (``session.route``); the first item's teacher is ``scorer``."""
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    # teacher.url: the teacher is a server (esr/train/remote_teacher.py), reached before any model loads.
    cfgs = teacher_configs(cfg)
    remotes = [connect_remote_teacher(c) if getattr(c.teacher, "url", None) is not None else None for c in cfgs]
    student, tokenizer, teacher, teacher_tok = _load_models(cfgs[0], device, dtype, remotes[0])
    loaded = [(teacher, teacher_tok), *(_load_models(c, device, dtype, r, student, tokenizer)[2:]
                                        for c, r in zip(cfgs[1:], remotes[1:], strict=True))]
    vocabs = [_vocabularies(c, student, tokenizer, t, tt, r)
              for c, r, (t, tt) in zip(cfgs, remotes, loaded, strict=True)]
    eos_ids = eos_token_ids(tokenizer, student)
    teacher_sampler = make_teacher_sampler(cfg, teacher, vocabs[0].cross_mode, eos_token_ids=eos_ids,
                                           pad_token_id=tokenizer.pad_token_id, vocab_size=vocabs[0].vocab_size)
    prompt_set, tokenized, mix = _prompts(cfg, tokenizer, student, *(t for t, _ in loaded))
    crosses = [None if v.cross_mode is None else _cross_tokenizer(c, tokenizer, tt, v, eos_ids, tokenized)
               for c, v, (_, tt) in zip(cfgs, vocabs, loaded, strict=True)]
    scorers = [_make_scorer(c, t, r, x, v, dtype, prompt_budget(cfg, student))
               for c, (t, _), r, x, v in zip(cfgs, loaded, remotes, crosses, vocabs, strict=True)]
    for scorer in scorers:
        check_supported(cfg.loss, scorer.capabilities)
    torch.manual_seed(cfg.seed)  # LoRA's A matrices are random: the seed makes a run (and its resume) repeatable
    student = _make_trainable(student, cfg)
    optimizer, scheduler = make_optimizer(student, cfg)
    pad_id = tokenizer.pad_token_id  # load_model guarantees one (eos when the tokenizer had none)
    sampler = make_sampler(cfg.rollout, student, eos_token_ids=eos_ids, pad_token_id=pad_id,
                           context=_engine_context(cfg, dtype, prompt_budget(cfg, student)))
    route = None if mix is None else make_route(cfg, cfgs, scorers, [v.vocab_size for v in vocabs], [
        _model_info(device, dtype, student, t, sc)["teacher_params"] for (t, _), sc in zip(loaded, scorers, strict=True)
    ], mix)
    info = {
        **_model_info(device, dtype, student, teacher, scorers[0]),
        **_vocabulary_info(vocabs[0], eos_ids, pad_id, crosses[0]),
        "prompts": len(tokenized.ids), "data_rows": prompt_set.n_rows, "data_skipped": prompt_set.n_skipped,
        "prompts_too_long": tokenized.n_too_long, **({} if route is None else {"mix": route.info}),
    }
    return Session(
        student=student, teacher=teacher, tokenizer=tokenizer, sampler=sampler, scorer=scorers[0],
        policy=make_policy(cfg.rollout), cross=crosses[0], prompt_ids=tokenized.ids, vocab_size=vocabs[0].vocab_size,
        optimizer=optimizer, scheduler=scheduler, device=device, info=info, route=route,
        teacher_sampler=teacher_sampler,
    )


def _load_models(cfg: Config, device: torch.device, dtype: torch.dtype, remote: RemoteScorer | None,
                 student: nn.Module | None = None,
                 tokenizer: Any = None) -> tuple[nn.Module, Any, nn.Module | None, Any]:
    """(student, its tokenizer, teacher, its tokenizer); a remote teacher loads nothing here (its tokenizer is
    checked against the student's by ``RemoteScorer.check_student``, so the student's stands for it), an in-process
    vLLM teacher only its tokenizer (``_make_scorer`` starts its engine). A ``student`` given is not loaded again
    (a mix's further teachers)."""
    if student is None:
        student, tokenizer = load_model(cfg.student.name, dtype=dtype, device=device,
                                        trust_remote_code=cfg.student.trust_remote_code,
                                        allow_pickle=cfg.student.allow_pickle)
    if remote is not None:
        return student, tokenizer, None, tokenizer
    if _teacher_engine(cfg) == "vllm":
        return student, tokenizer, None, load_tokenizer(cfg.teacher.name, cfg.teacher.trust_remote_code)
    teacher, teacher_tok = load_model(cfg.teacher.name, dtype=dtype, device=device,
                                      trust_remote_code=cfg.teacher.trust_remote_code,
                                      allow_pickle=cfg.teacher.allow_pickle)
    return student, tokenizer, teacher, teacher_tok


def _vocabularies(cfg: Config, student: nn.Module, tokenizer: Any, teacher: nn.Module | None, teacher_tok: Any,
                  remote: RemoteScorer | None) -> Vocabularies:
    """One id space (checked, with the logit columns both define) or two (``loss.cross_tokenizer``)."""
    mismatch = vocabulary_mismatch(tokenizer, teacher_tok)
    if mismatch is not None:
        _refuse_cross_tokenizer(cfg, mismatch)
    cross_mode = cfg.loss.cross_tokenizer if mismatch else None
    if cross_mode is not None:
        assert teacher is not None  # a remote teacher shares the student's tokenizer by construction
        return Vocabularies(cross_mode, student.get_output_embeddings().weight.shape[0],
                            teacher.get_output_embeddings().weight.shape[0])
    if cfg.loss.cross_tokenizer is not None:
        log.info("student and teacher share one vocabulary: loss.cross_tokenizer is ignored (same-tokenizer path)")
    require_shared_vocabulary(tokenizer, teacher_tok, cfg.student.name, cfg.teacher.name,
                              "same-tokenizer distillation", hint=CROSS_TOKENIZER_HINT)
    if remote is not None:
        vocab_size = remote.check_student(tokenizer, student, cfg)
    elif teacher is None:  # teacher.engine=vllm: the student's columns; top-k ids past them are no buckets
        vocab_size = shared_vocab_size(student, student, tokenizer)
    else:
        vocab_size = shared_vocab_size(student, teacher, tokenizer)
    return Vocabularies(None, vocab_size, vocab_size)


def _teacher_engine(cfg: Config) -> str:
    """``teacher.engine`` (a plain ``ModelConfig`` built in code is a local hf teacher)."""
    return getattr(cfg.teacher, "engine", "hf")


def _refuse_cross_tokenizer(cfg: Config, why: str) -> None:
    """The teachers that compare token ids directly cannot distil across tokenizers: say which keys to change."""
    names = f"student '{cfg.student.name}' and teacher '{cfg.teacher.name}' have different tokenizers ({why})"
    if _teacher_engine(cfg) == "vllm":
        raise ConfigError(f"teacher.engine=vllm scores the student's own token ids, but {names}: set "
                          "teacher.engine=hf (with loss.cross_tokenizer=aligned-exact|span-sampled), or pick a "
                          "teacher of the student's family")
    if cfg.loss.kind == "topk":
        raise ConfigError(f"loss.kind=topk compares the teacher's top-k token ids with the student's, but {names}: "
                          "set loss.kind=reverse_kl with loss.cross_tokenizer=aligned-exact (or loss.kind=sampled "
                          "with loss.cross_tokenizer=span-sampled), or pick a teacher of the student's family")


def _prompts(cfg: Config, tokenizer: Any, student: nn.Module,
             *teachers: nn.Module | None) -> tuple[PromptSet, TokenizedPrompts, MixPrompts | None]:
    """The training prompts, rendered for the student and capped to what every model's context window holds
    (``data.mix``: every source's, concatenated; the PromptSet then sums the sources' row counts)."""
    if not has_chat_template(tokenizer):
        log.warning("student '%s' has no chat template: prompts use the plain 'Question: ... Answer:' template, "
                    "which suits a base model; a chat model that lost its template would be trained off-format",
                    cfg.student.name)
    budget = prompt_budget(cfg, student, *(t for t in teachers if t is not None))
    if cfg.data.mix:
        mix = load_mix(cfg.data, tokenizer, budget)
        rows = [sum(v[k] for v in mix.info.values()) for k in ("data_rows", "data_skipped")]
        return PromptSet(mix.tokenized.prompts, "data.mix", rows[0], rows[1], (), {}), mix.tokenized, mix
    prompt_set = load_prompts(cfg.data)
    return prompt_set, tokenize_prompts(prompt_set.prompts, tokenizer, budget), None


def _cross_tokenizer(cfg: Config, tokenizer: Any, teacher_tok: Any, vocab: Vocabularies, eos_ids: list[int],
                     tokenized: TokenizedPrompts) -> CrossTokenizer:
    """The translator to the teacher's tokenization, with the teacher's ids of every prompt the student kept."""
    for warning in template_warnings(tokenizer, teacher_tok, cfg.student.name, cfg.teacher.name):
        log.warning(warning)
    teacher_prompts = tokenize_prompts(tokenized.prompts, teacher_tok, max_tokens=1 << 30)
    assert len(teacher_prompts.ids) == len(tokenized.ids), "the teacher dropped prompts the student kept"
    return CrossTokenizer(tokenizer, teacher_tok, student_size=vocab.vocab_size,
                          teacher_size=vocab.teacher_vocab_size, student_eos_ids=eos_ids,
                          teacher_prompt_ids=teacher_prompts.ids)


def _make_scorer(cfg: Config, teacher: nn.Module | None, remote: RemoteScorer | None, cross: CrossTokenizer | None,
                 vocab: Vocabularies, dtype: torch.dtype, prompt_tokens: int) -> TeacherScorer:
    """The run's teacher engine, picked once: a server, an in-process vLLM engine, a local teacher across
    tokenizers, or a local teacher."""
    if remote is not None:
        return remote
    if _teacher_engine(cfg) == "vllm":
        check_supported(cfg.loss, VLLMScorer.capabilities)  # before the engine starts
        return VLLMScorer(resolvable_base(cfg.teacher.name), dtype=dtype, seed=cfg.seed,
                          max_model_len=cfg.rollout.vllm.max_model_len or prompt_tokens + cfg.rollout.max_new_tokens,
                          top_k=cfg.loss.top_k if cfg.loss.kind == "topk" else 0, vocab_size=vocab.vocab_size,
                          kv_cache_gib=cfg.rollout.vllm.kv_cache_gib, trust_remote_code=cfg.teacher.trust_remote_code)
    assert teacher is not None
    local = LocalScorer(teacher, vocab_size=vocab.teacher_vocab_size)
    if cross is None:
        return local
    assert vocab.cross_mode is not None
    return CrossScorer(local, cross, vocab.cross_mode, chunk_size=cfg.loss.chunk_size)


def _engine_context(cfg: Config, dtype: torch.dtype, prompt_tokens: int) -> EngineContext | None:
    """What an engine needs beyond ``rollout``'s settings: the student as a folder it can load, how it is
    fine-tuned, the trainer's dtype and a context length that holds the longest prompt plus
    ``rollout.max_new_tokens``. None for ``hf`` sampling in the trainer's dtype (``rollout.dtype=auto``), which
    samples with the trainer's module itself and needs none of it."""
    if cfg.rollout.engine == "hf" and sample_dtype(cfg.rollout, dtype) == dtype:
        return None
    return EngineContext(source=resolvable_base(cfg.student.name), finetune=cfg.train.finetune,
                         lora_rank=cfg.lora.r, train_dtype=dtype, seed=cfg.seed,
                         max_model_len=cfg.rollout.vllm.max_model_len or prompt_tokens + cfg.rollout.max_new_tokens)


def _model_info(device: torch.device, dtype: torch.dtype, student: nn.Module, teacher: nn.Module | None,
                scorer: TeacherScorer) -> dict[str, Any]:
    """run.json's device, dtype and parameter counts (and the teacher server's or engine's description)."""
    remote = scorer if isinstance(scorer, RemoteScorer) else None
    if teacher is not None:
        teacher_params = sum(p.numel() for p in teacher.parameters())
    else:
        teacher_params = getattr(scorer, "params", 0)
    return {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "student_params": sum(p.numel() for p in student.parameters()),
        "trainable_params": sum(p.numel() for p in student.parameters() if p.requires_grad),
        "teacher_params": teacher_params,
        **({"teacher": remote.describe()} if remote is not None else {}),
        **({"teacher": scorer.describe()} if isinstance(scorer, VLLMScorer) else {}),
    }


def _vocabulary_info(vocab: Vocabularies, eos_ids: list[int], pad_id: int,
                     cross: CrossTokenizer | None) -> dict[str, Any]:
    """run.json's token facts: eos and pad ids, logit columns, and across tokenizers the shared vocabulary."""
    return {
        "eos_token_ids": eos_ids, "pad_token_id": pad_id, "pad_is_eos": pad_id in eos_ids,
        "vocab_size": vocab.vocab_size, "cross_tokenizer": vocab.cross_mode,
        **({"shared_vocab": len(cross.vocab_map), "teacher_vocab_size": vocab.teacher_vocab_size,
            "teacher_stop_id": cross.teacher_stop} if cross is not None else {}),
    }


def make_optimizer(student: nn.Module, cfg: Config) -> tuple[torch.optim.Optimizer,
                                                              torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the student's trainable parameters, with a linear warm-up over ``train.warmup_steps``, then a
    constant ``train.lr``. The rate of a step depends on the step alone, never on ``train.steps``: a run extended
    with ``esr train --resume RUN train.steps=N`` keeps the schedule it had (warm-up included) and ends exactly where
    a run started with N ends (esr/train/extend.py). A schedule that decays toward ``train.steps`` would break that,
    and would have to say what an extension does to it."""
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
