"""Held-out reverse KL of trained students from their teacher: ``esr probe heldout-kl``, the study's primary measure.

Every target (``esr.analysis.heldout_targets``: a run's checkpoint or its untrained student) samples one rollout
per held-out prompt (``esr.data.heldout``: prompts no target's training drew; the same prompts, in the same order,
and the same sampling seed for every target) at its run's temperature and top-p, to ``max_new_tokens`` tokens. The
run's teacher scores every sampled token without gradient, through EffOPD's KL probe (``esr.optim.probe.kl_probe``:
the same KL the loss computes, same- or cross-tokenizer; across tokenizers only the tokens both tokenizers cut 1:1
count). Per prompt i, with KL_i[r] the reverse KL KL(p_s || p_t) at response position r (0-based) and C_i the counted
positions:

    inside_i  = mean_{r in C_i, r <  split} KL_i[r]      (the first ``split`` tokens: ESR's trained window)
    beyond_i  = mean_{r in C_i, r >= split} KL_i[r]      (None when the rollout has no counted token there)
    all_i     = mean_{r in C_i}              KL_i[r]

A target's value for a range is the mean over prompts (every prompt weighs the same, whatever its length) with a
percentile-bootstrap 95% interval over prompts, and each later target is compared with the first on the same
prompts (paired bootstrap, ``esr.analysis.bootstrap``). Note that ``beyond`` averages only the prompts whose rollout
reaches ``split``: a target that stops earlier is measured on fewer (``n`` in the output).

    result = run_heldout_kl(resolve_targets(["runs/q@base", "runs/q"]), "out", prompts=128)
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esr.analysis.heldout_summary import summarize, write_summary
from esr.analysis.heldout_targets import Target
from esr.analysis.rollout_scores import AnalysisError, load_for_analysis, sample_rollouts
from esr.config import Config
from esr.data.heldout import HeldOutPrompts, heldout_prompts
from esr.models.pair import shared_vocab_size, vocabulary_mismatch
from esr.optim.probe import kl_probe, save_rollouts
from esr.progress import progress_bar
from esr.rollout.eos import eos_token_ids
from esr.teacher.cross import CrossTokenizer
from esr.teacher.cross_score import CrossScorer
from esr.teacher.score import LocalScorer

RANGES = ("inside", "beyond", "all")
"""The position ranges every prompt is averaged over (module docstring)."""
DEFAULT_SEED = 1234
"""Sampling seed of every target's rollouts."""


@dataclass(frozen=True)
class Settings:
    prompts: int
    max_new_tokens: int
    split: int
    seed: int
    prompts_how: str
    """How the held-out prompts were chosen."""
    prompt_ids: tuple[str, ...]
    """The prompts' source ids, in the order of every per-prompt list."""
    teacher: str


@dataclass
class TargetKL:
    """One target's per-prompt values (None: no counted token in the range) and what producing them cost."""

    label: str
    spec: str
    """The checkpoint folder, or the base student's name."""
    temperature: float
    per_prompt: dict[str, list[float | None]]
    """``inside`` / ``beyond`` / ``all`` -> one value per prompt (module docstring)."""
    tokens: list[int]
    """Counted tokens per prompt (every response token; across tokenizers the 1:1 pairs)."""
    lengths: list[int]
    """Response length per prompt (tokens sampled, EOS included)."""
    cut_share: float
    """Share of rollouts cut at ``max_new_tokens``."""
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _Pair:
    """What ``kl_probe`` reads of a training session, built here without one."""

    student: nn.Module
    tokenizer: Any
    teacher: nn.Module
    scorer: Any
    cross: CrossTokenizer | None
    vocab_size: int


def heldout_set(targets: Sequence[Target], tokenizer: Any, n: int) -> HeldOutPrompts:
    """``n`` prompts no target's run trained on, rendered for ``tokenizer`` (the first target's config decides how)."""
    runs = {t.run_dir.resolve(): t.cfg for t in targets}
    first = targets[0].cfg
    return heldout_prompts(first, tokenizer, n, [c for c in runs.values() if c is not first])


def run_heldout_kl(targets: Sequence[Target], out_dir: str | Path, *, prompts: int = 128,
                   max_new_tokens: int | None = None, split: int | None = None, seed: int = DEFAULT_SEED,
                   progress: bool = True) -> dict[str, Any]:
    """Measure every target (``measure``), then write heldout_kl.json, heldout_kl.md and the rollouts to
    ``out_dir``; returns the JSON document (``esr.analysis.heldout_summary``)."""
    out_dir = Path(out_dir)
    settings, results = measure(targets, prompts=prompts, max_new_tokens=max_new_tokens, split=split, seed=seed,
                                rollouts_dir=out_dir / "rollouts", progress=progress)
    summary = summarize(settings, results)
    write_summary(summary, out_dir)
    return summary


def measure(targets: Sequence[Target], *, prompts: int = 128, max_new_tokens: int | None = None,
            split: int | None = None, seed: int = DEFAULT_SEED, rollouts_dir: Path | None = None,
            progress: bool = True) -> tuple[Settings, list[TargetKL]]:
    """Sample, score and average every target on the same held-out prompts (module docstring). ``max_new_tokens``
    and ``split`` default to the first target's ``rollout.max_new_tokens`` and ``rollout.n``. With
    ``rollouts_dir``, each target's rollouts are kept there as ``<label>.safetensors``."""
    cfg0 = targets[0].cfg
    T = max_new_tokens or cfg0.rollout.max_new_tokens
    N = cfg0.rollout.n if split is None else split
    teacher, teacher_tok = load_for_analysis(cfg0.teacher.name, cfg0)
    results, settings, first_ids = [], None, None
    crosses: dict[tuple[str, int], CrossTokenizer] = {}  # a checkpoint shares its base's tables: built once
    with progress_bar(progress) as bar:
        task = bar.add_task("heldout-kl: sample + score", total=len(targets))
        for t in targets:
            student, tokenizer = load_for_analysis(t.spec, t.cfg)
            held = heldout_set(targets, tokenizer, prompts)
            if first_ids is None:
                first_ids = held.ids
                settings = Settings(len(held.ids), T, N, seed, held.how, held.ids, cfg0.teacher.name)
            elif held.ids != first_ids:
                raise AnalysisError(f"{t.label} draws other held-out prompts than {targets[0].label}; measure "
                                    "runs of one data set and student tokenizer together")
            results.append(_measure_one(t, _pair(student, tokenizer, teacher, teacher_tok, t.cfg, crosses), held, T, N,
                                        seed, rollouts_dir))
            del student
            gc.collect()
            bar.update(task, advance=1)
    assert settings is not None
    return settings, results


def _pair(student: nn.Module, tokenizer: Any, teacher: nn.Module, teacher_tok: Any, cfg: Config,
          crosses: dict[tuple[str, int], CrossTokenizer]) -> _Pair:
    """The student and teacher as ``kl_probe`` scores them: one id space, or aligned across tokenizers (the
    translator kept in ``crosses`` by student and output width, for the next target of that student)."""
    if vocabulary_mismatch(tokenizer, teacher_tok) is None:
        vocab = shared_vocab_size(student, teacher, tokenizer)
        return _Pair(student, tokenizer, teacher, LocalScorer(teacher, vocab_size=vocab), None, vocab)
    s_size = student.get_output_embeddings().weight.shape[0]
    t_size = teacher.get_output_embeddings().weight.shape[0]
    key = (cfg.student.name, s_size)
    if key not in crosses:
        crosses[key] = CrossTokenizer(tokenizer, teacher_tok, student_size=s_size, teacher_size=t_size,
                                      student_eos_ids=eos_token_ids(tokenizer, student), teacher_prompt_ids=())
    cross = crosses[key]
    scorer = CrossScorer(LocalScorer(teacher, vocab_size=t_size), cross, "aligned-exact",
                         chunk_size=cfg.loss.chunk_size)
    return _Pair(student, tokenizer, teacher, scorer, cross, s_size)


def _measure_one(t: Target, pair: _Pair, held: HeldOutPrompts, T: int, N: int, seed: int,
                 rollouts_dir: Path | None) -> TargetKL:
    t0 = time.perf_counter()
    rollouts = sample_rollouts(pair.student, pair.tokenizer, t.cfg, held.prompt_ids, T, seed)
    t1 = time.perf_counter()
    kl_B_R, mask_B_R = kl_probe(pair, t.cfg, held, rollouts).token_kl()
    t2 = time.perf_counter()
    if rollouts_dir is not None:
        save_rollouts(rollouts, rollouts_dir / f"{t.label}.safetensors")
    per_prompt = split_means(kl_B_R, mask_B_R, N)
    return TargetKL(
        label=t.label, spec=t.spec, temperature=t.cfg.rollout.temperature, per_prompt=per_prompt,
        tokens=mask_B_R.sum(dim=1).tolist(), lengths=rollouts.lengths_B.tolist(),
        cut_share=float(rollouts.cut_B.float().mean()) if len(rollouts) else 0.0,
        seconds={"sample": round(t1 - t0, 2), "score": round(t2 - t1, 2)},
    )


def split_means(kl_B_R: torch.Tensor, mask_B_R: torch.Tensor, split: int) -> dict[str, list[float | None]]:
    """Per row: the mean KL over counted positions r < split, r >= split and all (None where a range has none)."""
    kl, m = kl_B_R.double(), mask_B_R.bool()
    inside = torch.zeros_like(m)
    inside[:, :split] = True
    out: dict[str, list[float | None]] = {}
    for name, keep in (("inside", m & inside), ("beyond", m & ~inside), ("all", m)):
        count_B = keep.sum(dim=1)
        sum_B = torch.where(keep, kl, 0.0).sum(dim=1)
        out[name] = [None if c == 0 else s / c for s, c in zip(sum_B.tolist(), count_B.tolist(), strict=True)]
    return out
