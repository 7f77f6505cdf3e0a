"""The held-out scores that decide whether an extrapolation try is kept (``optim.extrapolate.probe``). Both are
losses: lower is better.

``reverse_kl`` (default, cheap and task-free): fixed held-out rollouts, sampled once from the initial student,

    probe(theta) = sum_{b, r in mask} KL(p_theta(. | x_b, y_b,<r) || p_t(. | x_b, y_b,<r)) / |mask|,

over every response token (same tokenizer) or the tokens aligned 1:1 on the shared vocabulary (across tokenizers,
as ``aligned-exact`` trains). The rollouts never change, so two calls on the same weights give the same number,
and the teacher never changes, so its hidden states (B x R x H) are computed once and kept; a call costs one
no-grad student forward plus both heads, a chunk of ``loss.chunk_size`` positions at a time. The rollouts are saved
as ``<run>/extrapolate/probe.safetensors``, so a resumed run probes the very same tokens.

``eval``: minus ``eval.metric`` of the ``eval`` task (greedy), on ``probe_size`` problems that come right after
the ``eval.limit`` ones the periodic evaluation reports, so the probe never selects on the reported problems.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from esr.config import Config, ConfigError
from esr.data import tokenize_prompts
from esr.data.heldout import HeldOutPrompts, heldout_prompts
from esr.eval.runner import evaluate
from esr.eval.tasks import EvalItem, Task, make_task
from esr.losses import reverse_kl
from esr.models.forward import head_logits, response_hidden
from esr.optim.extrapolate import Extrapolator, extrapolation_params
from esr.teacher.vocab_map import VocabMap
from esr.types import Rollouts

PROBE_SEED = 0x9E0BE
"""Mixed into the run seed for sampling the probe rollouts (a stream apart from training's)."""


class KLProbe:
    """Mean reverse KL of the student's current weights from the teacher on fixed rollouts (module docstring)."""

    def __init__(
        self, student: nn.Module, teacher: nn.Module, rollouts: Rollouts, teacher_hidden: list[torch.Tensor],
        mask_B_R: torch.Tensor, *, vocab_size: int, teacher_vocab_size: int, chunk_size: int,
        micro_batch_size: int, vocab_map: VocabMap | None = None,
    ) -> None:
        self.student, self.teacher, self.rollouts = student, teacher, rollouts
        self.teacher_hidden, self.mask_B_R = teacher_hidden, mask_B_R
        self.vocab_size, self.teacher_vocab_size = vocab_size, teacher_vocab_size
        self.chunk_size, self.micro_batch_size = chunk_size, micro_batch_size
        device = next(student.parameters()).device
        self.vocab_map = None if vocab_map is None else vocab_map.to(device)
        self.tokens = int(rollouts.attention_mask_B_L.sum())
        """Prompt + response tokens one call's student forward reads."""

    @torch.no_grad()
    def __call__(self) -> float:
        kl_sum, count = 0.0, int(self.mask_B_R.sum())
        for _, _, kl_B_T, mask_B_T in self._chunks():
            kl_sum += float(torch.where(mask_B_T, kl_B_T, 0.0).sum(dtype=torch.float64))
        return kl_sum / max(1, count)

    @torch.no_grad()
    def token_kl(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(kl_B_R, mask_B_R)``: the reverse KL at every response position (float32, CPU, 0 where not counted)
        and which positions the probe counts (every response token; across tokenizers the exact 1:1 pairs).
        ``__call__`` is ``kl_B_R.sum() / mask_B_R.sum()``."""
        B, R = self.mask_B_R.shape
        kl_B_R = torch.zeros(B, R)
        for rows, cols, kl_B_T, mask_B_T in self._chunks():
            kl_B_R[rows, cols] = torch.where(mask_B_T, kl_B_T, 0.0)
        return kl_B_R, self.mask_B_R.bool().cpu()

    @torch.no_grad()
    def per_position(self) -> torch.Tensor:
        """The KL mass per response position: float64 (R,), sum over the rollouts of the masked reverse KL (what
        ``rollout.horizon=auto``'s rule reads; esr/rollout/auto_horizon.py)."""
        mass_R = torch.zeros(self.mask_B_R.shape[1], dtype=torch.float64)
        for _, cols, kl_B_T, mask_B_T in self._chunks():
            mass_R[cols] += torch.where(mask_B_T, kl_B_T, 0.0).sum(dim=0, dtype=torch.float64)
        return mass_R

    def _chunks(self) -> Iterator[tuple[slice, slice, torch.Tensor, torch.Tensor]]:
        """Per (micro-batch, chunk of positions): its rows, its columns, the KL there (CPU) and the counted mask,
        the student in eval mode meanwhile."""
        was_training = self.student.training
        self.student.eval()
        try:
            for i, a in enumerate(range(0, len(self.rollouts), self.micro_batch_size)):
                mb = self.rollouts.slice(a, a + self.micro_batch_size)
                r = mb.response_mask_B_R.shape[1]
                mask_B_R = self.mask_B_R[a:a + len(mb), :r]
                student_B_R_H, teacher_B_R_H = response_hidden(self.student, mb), self.teacher_hidden[i]
                for c in range(0, r, self.chunk_size):
                    d = min(r, c + self.chunk_size)
                    s_logits = head_logits(self.student, student_B_R_H[:, c:d], self.vocab_size)
                    t_logits = head_logits(self.teacher, teacher_B_R_H[:, c:d], self.teacher_vocab_size)
                    if self.vocab_map is not None:
                        s_logits, t_logits = self.vocab_map.restrict(s_logits, t_logits)
                    yield slice(a, a + len(mb)), slice(c, d), reverse_kl(s_logits, t_logits).cpu(), mask_B_R[:, c:d]
        finally:
            self.student.train(was_training)


class EvalProbe:
    """Minus ``eval.metric`` on held-out problems of the ``eval`` task (module docstring)."""

    def __init__(self, student: nn.Module, tokenizer: Any, cfg: Config) -> None:
        self.student, self.tokenizer, self.cfg = student, tokenizer, cfg
        x = cfg.optim.extrapolate
        self.task = _Skip(make_task(cfg.eval.task, path=cfg.eval.path), skip=cfg.eval.limit)
        self.limit = x.probe_size
        self.tokens = 0  # generation-bound; not counted in FLOPs

    def __call__(self) -> float:
        e = self.cfg.eval
        result = evaluate(self.student, self.tokenizer, self.task, n=1, temperature=0.0, limit=self.limit,
                          max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, seed=0, progress=False)
        if e.metric not in result.summary:
            raise ConfigError(f"eval.metric={e.metric!r} is not in the summary of task {self.task.name}, so "
                              "optim.extrapolate.probe=eval cannot use it; set eval.metric or probe=reverse_kl")
        return -float(result.summary[e.metric])


class _Skip:
    """A task without its first ``skip`` problems."""

    def __init__(self, task: Task, skip: int) -> None:
        self.task, self.skip = task, skip
        self.name, self.kind = f"{task.name}[{skip}:]", task.kind

    def load(self, limit: int | None) -> list[EvalItem]:
        items = self.task.load(None if limit is None else self.skip + limit)[self.skip:]
        if not items:
            raise ConfigError(f"task {self.task.name} has no problems after the first eval.limit={self.skip} "
                              "for optim.extrapolate.probe=eval; lower eval.limit or use probe=reverse_kl")
        return items

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task, name)


def make_extrapolator(session: Any, cfg: Config, run_dir: Path) -> Extrapolator:
    """The run's Extrapolator, with theta_base = the student's current weights (call before loading a checkpoint:
    the KL probe samples its rollouts from the initial student). ``session``: an ``esr.train.session.Session``."""
    x = cfg.optim.extrapolate
    probe = (build_kl_probe(session, cfg, run_dir) if x.probe == "reverse_kl"
             else EvalProbe(session.student, session.tokenizer, cfg))
    return Extrapolator(extrapolation_params(session.student, x.params), x, probe, session.optimizer,
                        probe_tokens=probe.tokens)


def probe_prompts(cfg: Config, tokenizer: Any) -> HeldOutPrompts:
    """``probe_size`` held-out prompts; with generated problems, those after the ones ``esr eval`` reports
    (its first ``eval.limit``), so extrapolation never selects on the reported problems."""
    n = cfg.optim.extrapolate.probe_size
    if cfg.data.source != "gsm_symbolic":
        return heldout_prompts(cfg, tokenizer, n)
    skip = cfg.eval.limit
    held = heldout_prompts(cfg, tokenizer, skip + n)
    return HeldOutPrompts(held.prompt_ids[skip:], held.ids[skip:], held.how + f", after the first {skip}",
                          held.prompts[skip:])


def build_kl_probe(session: Any, cfg: Config, run_dir: Path) -> KLProbe:
    """Sample (or reload) the probe rollouts with the student's current, i.e. initial, weights and score them with
    the teacher once. ``session`` is an ``esr.train.session.Session``."""
    s, x = session, cfg.optim.extrapolate
    held = probe_prompts(cfg, s.tokenizer)
    path = run_dir / "extrapolate" / "probe.safetensors"
    if path.is_file():
        rollouts = load_rollouts(path)
    else:
        tokens = x.probe_tokens or s.policy.plan(0)
        rollouts = s.sampler.sample(held.prompt_ids, tokens, seed=PROBE_SEED + cfg.seed)
        save_rollouts(rollouts, path)
    return kl_probe(s, cfg, held, rollouts)


def kl_probe(session: Any, cfg: Config, held: HeldOutPrompts, rollouts: Rollouts) -> KLProbe:
    """A KLProbe of the session's student on ``rollouts`` of the prompts ``held`` (the teacher runs here, once)."""
    s, mb, hidden = session, cfg.train.micro_batch_size, []
    mask_B_R, vocab_map = rollouts.response_mask_B_R, None
    if s.cross is None:
        hidden = s.scorer.score_micro_batches(rollouts, mb, cfg.train.teacher_batch_size)
    else:
        teacher_prompts = tokenize_prompts(held.prompts, s.cross.teacher_tok, max_tokens=1 << 30)
        cross = s.cross.with_prompts(teacher_prompts.ids).translate(rollouts, range(len(rollouts)))
        mask_B_R, vocab_map = mask_B_R & cross.exact_B_R, s.cross.vocab_map
        for a in range(0, len(rollouts), mb):
            part = rollouts.slice(a, a + mb)
            hidden.append(s.scorer.score_aligned(cross.slice(a, a + mb, part.response_mask_B_R.shape[1])))
    return KLProbe(s.student, s.teacher, rollouts, hidden, mask_B_R, vocab_size=s.vocab_size,
                   teacher_vocab_size=s.scorer.vocab_size, chunk_size=cfg.loss.chunk_size, micro_batch_size=mb,
                   vocab_map=vocab_map)


def save_rollouts(rollouts: Rollouts, path: Path) -> None:
    """Write rollouts as one safetensors file, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tensors = {"input_ids_B_L": rollouts.input_ids_B_L, "attention_mask_B_L": rollouts.attention_mask_B_L,
               "response_mask_B_R": rollouts.response_mask_B_R, "cut_B": rollouts.cut_B}
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp),
              metadata={"esr": json.dumps({"prompt_len": rollouts.prompt_len, "horizon": rollouts.horizon})})
    os.replace(tmp, path)


def load_rollouts(path: Path) -> Rollouts:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["esr"])
    t = load_file(str(path))
    return Rollouts(input_ids_B_L=t["input_ids_B_L"], attention_mask_B_L=t["attention_mask_B_L"],
                    response_mask_B_R=t["response_mask_B_R"], prompt_len=int(meta["prompt_len"]),
                    horizon=int(meta["horizon"]), cut_B=t["cut_B"])
