"""What every analysis shares: the config and checkpoints of a run, models and sampling, and the one function that
scores rollouts token by token under a student and a teacher.

``score_rollouts`` runs both decoders once (no grad, eval mode) and projects their hidden states a time-chunk at a
time, so the B x R x V logits never exist in full. At every response position r of every rollout it keeps

    KL_B_R[b, r] = KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v))     (0 where the rollout has ended),

with p = softmax(logits[..., :vocab_size]) at temperature 1 (the distributions the loss compares), the top-k token
ids and probabilities of both models there and, when asked, both entropies H(p) = -sum_v p(v) log p(v). Same
tokenizer only (``check_same_tokenizer``): the two top-k lists index one vocabulary.

Held-out prompts (``heldout_prompts``) come from ``esr.data.heldout``; device, dtype and the vocabulary check from
``esr.models.pair``, as in training.
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
from esr.errors import EsrError
from esr.losses import entropy, reverse_kl
from esr.models.checkpoints import checkpoint_dir, latest_checkpoint, list_checkpoints
from esr.models.forward import head_logits, response_hidden
from esr.models.load import load_tokenizer
from esr.models.pair import load_frozen, require_shared_vocabulary, resolve_device, resolve_dtype
from esr.rollout.eos import eos_token_ids
from esr.rollout.sampler import HFSampler
from esr.types import Rollouts

log = logging.getLogger("esr.analysis")

class AnalysisError(EsrError, ValueError):
    """An analysis cannot run as asked (cross-tokenizer pair, no checkpoint, mismatched runs); the message says why."""


@dataclass(frozen=True)
class PairScores:
    """Per-token scores of B rollouts of R response positions under a student and a teacher; K = top-k size. CPU
    tensors."""

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
    student_entropy_B_R: torch.Tensor | None = None
    """H(p_s) at each position, float32, 0 where ``mask_B_R`` is False; None unless ``entropies`` was asked."""
    teacher_entropy_B_R: torch.Tensor | None = None

    @property
    def student_top1_prob_B_R(self) -> torch.Tensor:
        """max_v p_s(v) at each position."""
        return self.student_topk_probs_B_R_K[..., 0]

    @property
    def lengths_B(self) -> torch.Tensor:
        return self.mask_B_R.sum(dim=1)


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put models in eval mode (no dropout) for the block and restore their training flags after."""
    flags = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(models, flags, strict=True):
            m.train(flag)


@torch.no_grad()
def score_rollouts(
    student: nn.Module, teacher: nn.Module, rollouts: Rollouts, vocab_size: int, *, chunk: int = 64, topk: int = 5,
    micro_batch: int | None = 4, entropies: bool = False,
) -> PairScores:
    """Reverse KL, both models' top-k and (``entropies``) both entropies at every response token of ``rollouts``
    (module docstring), the models in eval mode.

    Rows go ``micro_batch`` at a time (None: all at once) through both decoders; each (rows x chunk) block of
    positions is projected to float32 logits, so peak logits memory is 2 x micro_batch x chunk x V floats.
    """
    B, R = rollouts.response_mask_B_R.shape
    rows = micro_batch or max(B, 1)
    kl_B_R = torch.zeros(B, R)
    ids = {who: torch.zeros(B, R, topk, dtype=torch.long) for who in ("s", "t")}
    probs = {who: torch.zeros(B, R, topk) for who in ("s", "t")}
    ent = {who: torch.zeros(B, R) for who in ("s", "t")}
    with eval_mode(student, teacher):
        for a in range(0, B, rows):
            mb = rollouts.slice(a, a + rows)
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
                    if entropies:
                        ent[who][a : a + b, c:stop] = entropy(lg).cpu()
                    if topk:
                        top = torch.softmax(lg, dim=-1).topk(topk, dim=-1)
                        ids[who][a : a + b, c:stop] = top.indices.cpu()
                        probs[who][a : a + b, c:stop] = top.values.cpu()
    mask_B_R = rollouts.response_mask_B_R.bool().cpu()
    return PairScores(
        tokens_B_R=rollouts.response_ids_B_R.cpu(), mask_B_R=mask_B_R, kl_B_R=kl_B_R.masked_fill(~mask_B_R, 0.0),
        student_topk_ids_B_R_K=ids["s"], student_topk_probs_B_R_K=probs["s"],
        teacher_topk_ids_B_R_K=ids["t"], teacher_topk_probs_B_R_K=probs["t"],
        **({"student_entropy_B_R": ent["s"].masked_fill(~mask_B_R, 0.0),
            "teacher_entropy_B_R": ent["t"].masked_fill(~mask_B_R, 0.0)} if entropies else {}),
    )


# ----------------------------------------------------------------------------------------------------------------
# Runs, models and prompts.


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run (or a checkpoint folder) was started with."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise AnalysisError(f"{run_dir} is not a run folder (no config.yaml)")
    return load_config(path)


def as_config(config: str | Path | Config) -> Config:
    """A Config from a YAML path or a Config."""
    return config if isinstance(config, Config) else load_config(config)


def resolve_checkpoint(run_dir: str | Path, checkpoint: str | int = "last") -> Path:
    """``"last"`` (highest step), a step number, a folder name ``step-NNNNNN`` under checkpoints/, or a path."""
    run_dir = Path(run_dir)
    if checkpoint == "last":
        found = latest_checkpoint(run_dir)
        if found is None:
            raise AnalysisError(f"{run_dir} has no checkpoint under checkpoints/; train it first")
        return found
    if isinstance(checkpoint, int) or str(checkpoint).isdigit():
        candidate = checkpoint_dir(run_dir, int(checkpoint))
    elif Path(checkpoint).is_dir():
        candidate = Path(checkpoint)
    else:
        candidate = run_dir / "checkpoints" / str(checkpoint)
    if not candidate.is_dir():
        have = [p.name for p in list_checkpoints(run_dir)] or ["none"]
        raise AnalysisError(f"checkpoint {checkpoint!r} not found in {run_dir} (have: {', '.join(have)})")
    return candidate


def check_same_tokenizer(student_spec: str, teacher_spec: str) -> None:
    """Raise ConfigError unless both specs share one id space (checked on tokenizers, before loading weights)."""
    require_shared_vocabulary(
        load_tokenizer(student_spec), load_tokenizer(teacher_spec), student_spec, teacher_spec, "this analysis",
        hint="These analyses compare the two next-token distributions over one vocabulary (per-token KL, top-k "
             "ranks), so they support same-tokenizer pairs only.")


def load_for_analysis(spec: str | Path, cfg: Config) -> tuple[nn.Module, Any]:
    """``load_model(spec)`` on the run's device and dtype (``auto``: fp32 on CPU), frozen, in eval mode."""
    device = resolve_device(cfg.train.device)
    return load_frozen(str(spec), device, resolve_dtype(cfg.train.dtype, device))


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
