"""What every analysis shares: held-out prompts, models of a run, sampling, and per-token scores of rollouts.

``score_rollouts`` runs both decoders once (no grad) and projects their hidden states a time-chunk at a time, so
the B x R x V logits never exist in full. At every response position r of every rollout it keeps

    KL_B_R[b, r] = KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v))     (0 where the rollout has ended),

with p = softmax(logits[..., :vocab_size]) at temperature 1 (the distributions the loss compares), and the top-k
token ids and probabilities of both models there. Same tokenizer only: the two top-k lists index one vocabulary.

Held-out prompts (``heldout_prompts``) come from ``esr.data.heldout``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esr.config import Config, load_config
from esr.data.heldout import HELDOUT_SEED, HeldOutPrompts, heldout_prompts  # noqa: F401  (re-exported)
from esr.losses import reverse_kl
from esr.models import load_model
from esr.models.checkpoints import latest_checkpoint
from esr.models.forward import head_logits, response_hidden
from esr.models.load import load_tokenizer
from esr.rollout.eos import eos_token_ids
from esr.rollout.sampler import HFSampler
from esr.train.session import resolve_device, resolve_dtype, shared_vocab_size, vocabulary_mismatch
from esr.types import Rollouts

log = logging.getLogger("esr.analysis")

class AnalysisError(ValueError):
    """An analysis cannot run as asked (cross-tokenizer pair, no checkpoint, mismatched runs); the message says why."""


@dataclass(frozen=True)
class RolloutScores:
    """Per-token scores of B rollouts of R response positions; K = top-k size. CPU tensors."""

    tokens_B_R: torch.Tensor
    """Sampled response token ids (int64)."""
    mask_B_R: torch.Tensor
    """Bool: the token exists (EOS included); False on padding after a rollout ended."""
    kl_B_R: torch.Tensor
    """Reverse KL(p_s || p_t) at each position, float32; 0 where ``mask_B_R`` is False."""
    student_topk_ids_B_R_K: torch.Tensor
    student_topk_probs_B_R_K: torch.Tensor
    teacher_topk_ids_B_R_K: torch.Tensor
    teacher_topk_probs_B_R_K: torch.Tensor

    @property
    def student_top1_prob_B_R(self) -> torch.Tensor:
        """max_v p_s(v) at each position."""
        return self.student_topk_probs_B_R_K[..., 0]

    @property
    def lengths_B(self) -> torch.Tensor:
        return self.mask_B_R.sum(dim=1)


@torch.no_grad()
def score_rollouts(
    student: nn.Module, teacher: nn.Module, rollouts: Rollouts, vocab_size: int, *, chunk: int = 64, topk: int = 5,
    micro_batch: int = 4,
) -> RolloutScores:
    """Reverse KL and both models' top-k at every response token of ``rollouts`` (module docstring).

    Rows go ``micro_batch`` at a time through both decoders; each (rows x chunk) block of positions is projected to
    float32 logits, so peak logits memory is 2 x micro_batch x chunk x V floats.
    """
    B, R = rollouts.response_mask_B_R.shape
    kl_B_R = torch.zeros(B, R)
    ids = {who: torch.zeros(B, R, topk, dtype=torch.long) for who in ("s", "t")}
    probs = {who: torch.zeros(B, R, topk) for who in ("s", "t")}
    for a in range(0, B, micro_batch):
        mb = rollouts.slice(a, a + micro_batch)
        b, n_resp = mb.response_mask_B_R.shape
        if n_resp == 0:
            continue
        hidden = {"s": response_hidden(student, mb), "t": response_hidden(teacher, mb)}
        for c in range(0, n_resp, chunk):
            logits = {who: head_logits(m, hidden[who][:, c : c + chunk], vocab_size)
                      for who, m in (("s", student), ("t", teacher))}
            stop = c + logits["s"].shape[1]
            kl_B_R[a : a + b, c:stop] = reverse_kl(logits["s"], logits["t"]).cpu()
            for who, lg in logits.items():
                top = torch.softmax(lg, dim=-1).topk(topk, dim=-1)
                ids[who][a : a + b, c:stop] = top.indices.cpu()
                probs[who][a : a + b, c:stop] = top.values.cpu()
    mask_B_R = rollouts.response_mask_B_R.bool()
    return RolloutScores(
        tokens_B_R=rollouts.response_ids_B_R.cpu(), mask_B_R=mask_B_R, kl_B_R=kl_B_R.masked_fill(~mask_B_R, 0.0),
        student_topk_ids_B_R_K=ids["s"], student_topk_probs_B_R_K=probs["s"],
        teacher_topk_ids_B_R_K=ids["t"], teacher_topk_probs_B_R_K=probs["t"],
    )


# ----------------------------------------------------------------------------------------------------------------
# Runs, models and prompts.


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run (or a checkpoint folder) was started with."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise AnalysisError(f"{run_dir} is not a run folder (no config.yaml)")
    return load_config(path)


def resolve_checkpoint(run_dir: str | Path, checkpoint: str | int = "last") -> Path:
    """``"last"`` (highest step), a step number, a folder name ``step-NNNNNN`` under checkpoints/, or a path."""
    run_dir = Path(run_dir)
    if checkpoint == "last":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise AnalysisError(f"{run_dir} has no checkpoint under checkpoints/; train it first")
        return found
    if isinstance(checkpoint, int) or str(checkpoint).isdigit():
        candidate = run_dir / "checkpoints" / f"step-{int(checkpoint):06d}"
    elif Path(checkpoint).is_dir():
        candidate = Path(checkpoint)
    else:
        candidate = run_dir / "checkpoints" / str(checkpoint)
    if not candidate.is_dir():
        have = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) or ["none"]
        raise AnalysisError(f"checkpoint {checkpoint!r} not found in {run_dir} (have: {', '.join(have)})")
    return candidate


def check_same_tokenizer(student_spec: str, teacher_spec: str) -> None:
    """Raise AnalysisError unless both specs share one id space (checked on tokenizers, before loading weights)."""
    why = vocabulary_mismatch(load_tokenizer(student_spec), load_tokenizer(teacher_spec))
    if why is not None:
        raise AnalysisError(
            f"student {student_spec!r} and teacher {teacher_spec!r} have different tokenizers ({why}). These "
            "analyses compare the two next-token distributions over one vocabulary (per-token KL, top-k ranks), "
            "so they support same-tokenizer pairs only."
        )


def load_for_analysis(spec: str | Path, cfg: Config) -> tuple[nn.Module, Any]:
    """``load_model(spec)`` on the run's device and dtype (``auto``: fp32 on CPU), frozen, in eval mode."""
    device = resolve_device(cfg.train.device)
    model, tokenizer = load_model(str(spec), dtype=resolve_dtype(cfg.train.dtype, device), device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tokenizer


def analysis_vocab_size(student: nn.Module, teacher: nn.Module, tokenizer: Any) -> int:
    """Logit columns both models define (as in training)."""
    return shared_vocab_size(student, teacher, tokenizer)


def sample_rollouts(
    model: nn.Module, tokenizer: Any, cfg: Config, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, seed: int
) -> Rollouts:
    """One rollout per prompt at the run's sampling settings (temperature, top-p), stopping at the model's EOS."""
    r = cfg.rollout
    sampler = HFSampler(model, eos_token_ids=eos_token_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id,
                        temperature=r.temperature, top_p=r.top_p, batch_size=r.batch_size)
    return sampler.sample(prompt_ids, max_new_tokens, seed=seed)


@contextmanager
def phase(name: str, seconds: dict[str, float], progress: bool) -> Iterator[None]:
    """Time a block into ``seconds[name]``; with ``progress`` print one line to stderr when it ends."""
    t0 = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
    if progress:
        print(f"  {name}: {seconds[name]:.1f} s", file=sys.stderr, flush=True)


def nan_to_none(x: float) -> float | None:
    """JSON has no NaN: report an undefined value as null."""
    return None if x != x else float(x)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None (strict JSON), through dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj
