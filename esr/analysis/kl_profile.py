"""KL profile: where in the student's answer the teacher disagrees with it, and the N that ESR should supervise.

R student rollouts are sampled (no training) at the rollout temperature; at every response position t (1-based: t
is the t-th generated token) both models' untempered next-token distributions are compared exactly over the shared
vocabulary, a time-chunk at a time (never B x T x V logits for long T):

    KL_t  = KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v))        (reverse KL, the OPD / ESR loss)
    H_s,t = -sum_v p_s(v) log p_s(v)          H_t,t = -sum_v p_t(v) log p_t(v)

Aggregation: a rollout is *alive* at t while t <= its length (its EOS included). Per position, mean / std
(population, ddof=0) / p25 / p75 (linear interpolation) over the alive rollouts; per bucket of ``bucket`` positions
the same statistics pooled over every alive (rollout, position) value in the bucket.

The recommended N comes from the token-mass rule, the one ``rollout.horizon=auto`` applies during training
(``esr.rollout.auto_horizon.horizon_rule``; here without clamps or a previous N):

    M(t) = sum over rollouts alive at t of KL_t                  (the share of the token-level KL total: what a
    C_M(t) = sum_{u<=t} M(u) / sum_u M(u)                         full-rollout OPD loss sums)
    N    = min { t : C_M(t) >= share }                            (the paper's rule of thumb: ~45% of the KL)

The position-weighted variant is the second opinion, ``recommended_n_position``: m(t) = the MEAN over the rollouts
alive at t, so each position weighs the same however many rollouts are still alive there (late positions, where few
long answers remain, weigh as much as early ones: 265 against 114 on the quickstart pair at 512 tokens).

Top-k share (what ``loss.select=top-kl-n`` keeps of the loss): for each rollout b with alive tokens A_b,

    S_k(b) = sum of the k largest KL_t over A_b / sum_{t in A_b} KL_t      (1 when |A_b| <= k)

reported as the mean over rollouts and pooled (top-k sums over all rollouts / their KL total) for k = 50, 100, 200,
with the mean share of tokens it keeps, k / |A_b| capped at 1 (the paper: the top-100 carry ~93% of the loss).

    run_kl_profile("configs/quickstart.yaml", "runs/profile", rollouts=8, max_new_tokens=256).recommended_n
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from esr.analysis.rollout_scores import as_config, score_rollouts
from esr.config import Config, ConfigError
from esr.models.pair import load_pair, shared_vocab_size
from esr.plots import COLORS, line_with_band, new_figure, save_png
from esr.progress import progress_bar
from esr.rollout.auto_horizon import RULE, RULE_TEXT, cumulative_share, horizon_rule, recommend_n
from esr.types import Rollouts

STATS = ("mean", "std", "p25", "p75")
QUANTITIES = ("kl", "student_entropy", "teacher_entropy")


@dataclass(frozen=True)
class PositionStats:
    """Statistics over the rollouts alive at each position; arrays of shape (T,), NaN where none is alive."""

    mean_T: np.ndarray
    std_T: np.ndarray
    p25_T: np.ndarray
    p75_T: np.ndarray
    alive_T: np.ndarray  # rollouts alive at each position (int)


@dataclass(frozen=True)
class BucketStats:
    """Statistics pooled over the alive (rollout, position) values of positions ``start..stop`` (1-based)."""

    start: int
    stop: int
    mean: float
    std: float
    p25: float
    p75: float
    tokens: int  # values pooled: alive rollouts summed over the bucket's positions
    alive: int  # rollouts alive at the bucket's first position
    rollout_p25: float  # quartiles over rollouts of each rollout's own mean in the bucket (the plots' bands)
    rollout_p75: float


@dataclass
class KLProfile:
    """The profile of one student-teacher pair; per-token values are rows of the concatenated rollout batches."""

    positions: dict[str, PositionStats]  # per-position statistics of kl, student_entropy, teacher_entropy
    buckets: dict[str, list[BucketStats]]
    cumulative_T: np.ndarray  # C(t) from the per-position mean KL (position-weighted; module docstring)
    cumulative_mass_T: np.ndarray  # C_M(t) from the per-position KL sum over rollouts (the token-mass rule's)
    recommended_n: int | None  # the token-mass rule: smallest 1-based t with C_M(t) >= share; None when KL is all 0
    recommended_n_position: int | None  # the second opinion: smallest t with C(t) >= share
    share: float
    bucket: int
    values_B_R: dict[str, torch.Tensor]
    """Per-token ``kl``, ``student_entropy``, ``teacher_entropy``, float32 (B, R), 0 where not alive."""
    mask_B_R: torch.Tensor
    rollouts: tuple[Rollouts, ...]  # the sampled batches, in order: their rows are the rows of values_B_R
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def position_stats(values_B_R: np.ndarray | torch.Tensor, mask_B_R: np.ndarray | torch.Tensor) -> PositionStats:
    """Mean, population std, p25, p75 and alive count of ``values`` over the rows where ``mask`` is set, per column."""
    values, mask = np.asarray(values_B_R, dtype=np.float64), np.asarray(mask_B_R, dtype=bool)
    out = {s: np.full(values.shape[1], np.nan) for s in STATS}
    for t in range(values.shape[1]):
        v = values[mask[:, t], t]
        if v.size:
            out["mean"][t], out["std"][t] = v.mean(), v.std()
            out["p25"][t], out["p75"][t] = np.percentile(v, 25), np.percentile(v, 75)
    return PositionStats(out["mean"], out["std"], out["p25"], out["p75"], mask.sum(axis=0).astype(int))


def bucket_stats(values_B_R: np.ndarray | torch.Tensor, mask_B_R: np.ndarray | torch.Tensor,
                 bucket: int) -> list[BucketStats]:
    """Statistics pooled over consecutive buckets of ``bucket`` positions: positions 1..bucket, bucket+1..2*bucket, ...

    plus the quartiles over rollouts of each rollout's mean over its alive positions in the bucket (how much the
    curve varies from answer to answer; token quartiles of a heavy-tailed KL sit far below its mean). Empty buckets
    (no alive value) are left out.
    """
    if bucket < 1:
        raise ValueError(f"bucket must be at least 1, got {bucket}")
    values, mask = np.asarray(values_B_R, dtype=np.float64), np.asarray(mask_B_R, dtype=bool)
    out = []
    for s in range(0, values.shape[1], bucket):
        block, alive = values[:, s : s + bucket], mask[:, s : s + bucket]
        if (v := block[alive]).size:
            rows = alive.any(axis=1)
            per_rollout = np.where(alive, block, 0.0).sum(axis=1)[rows] / alive.sum(axis=1)[rows]
            out.append(BucketStats(s + 1, min(s + bucket, values.shape[1]), float(v.mean()), float(v.std()),
                                   float(np.percentile(v, 25)), float(np.percentile(v, 75)), int(v.size),
                                   int(mask[:, s].sum()), *(float(np.percentile(per_rollout, q)) for q in (25, 75))))
    return out


def kl_profile(
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    rollouts: int = 16,
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 1.0,
    share: float = 0.45,
    bucket: int = 10,
    seed: int = 0,
    vocab_size: int | None = None,
    batch_size: int = 8,
    chunk_size: int = 64,
    progress: bool = False,
) -> KLProfile:
    """Sample ``rollouts`` student answers (prompts taken in order, cycled) and profile them (module docstring).

    Same tokenizer only: check with ``require_shared_vocabulary`` (``run_kl_profile`` does). ``vocab_size``
    defaults to the columns both output layers have. Batch b is sampled with seed ``seed * 1_000_003 + first row``.
    """
    from esr.rollout.eos import eos_token_ids
    from esr.rollout.sampler import HFSampler

    if rollouts < 1 or not prompt_ids:
        raise ValueError(f"kl_profile needs at least one prompt and one rollout, got {len(prompt_ids)} / {rollouts}")
    recommend_n([1.0], share)  # validates share before any compute
    vocab_size = vocab_size or shared_vocab_size(student, teacher, tokenizer)
    sampler = HFSampler(student, eos_token_ids=eos_token_ids(tokenizer, student), pad_token_id=tokenizer.pad_token_id,
                        temperature=temperature, top_p=top_p)
    rows = [prompt_ids[i % len(prompt_ids)] for i in range(rollouts)]
    batches, values, seconds = [], [], {"sample": 0.0, "score": 0.0}
    with progress_bar(progress) as bar:
        task = bar.add_task("kl-profile: sample + score", total=rollouts)
        for start in range(0, rollouts, batch_size):
            t0 = time.perf_counter()
            batch = sampler.sample(rows[start : start + batch_size], max_new_tokens, seed=seed * 1_000_003 + start)
            t1 = time.perf_counter()
            values.append(token_values(student, teacher, batch, vocab_size, chunk_size))
            seconds["sample"] += t1 - t0
            seconds["score"] += time.perf_counter() - t1
            batches.append(batch)
            bar.update(task, advance=len(batch))
    profile = summarize_profile(*_stack(values, batches), share=share, bucket=bucket)
    profile.rollouts, profile.seconds = tuple(batches), seconds
    profile.settings = dict(rollouts=rollouts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            share=share, bucket=bucket, seed=seed, vocab_size=vocab_size, prompts=len(prompt_ids))
    return profile


def token_values(student: nn.Module, teacher: nn.Module, rollouts: Rollouts, vocab_size: int,
                 chunk_size: int) -> dict[str, torch.Tensor]:
    """Per-token reverse KL and both entropies of one batch (``score_rollouts``, all rows at once, no top-k):
    float32 (B, R) on CPU, 0 where the rollout has ended."""
    scores = score_rollouts(student, teacher, rollouts, vocab_size, chunk=chunk_size, topk=0, micro_batch=None,
                            entropies=True)
    return {"kl": scores.kl_B_R, "student_entropy": scores.student_entropy_B_R,
            "teacher_entropy": scores.teacher_entropy_B_R}


def kl_profile_session(session: Any, **kwargs: Any) -> KLProfile:
    """``kl_profile`` on a ``build_session`` Session: its student, teacher, tokenizer, prompts and shared vocabulary."""
    if session.cross is not None:
        raise ConfigError("kl-profile needs a shared vocabulary: it compares student and teacher token by token in one "
                          "id space, and this session's teacher has another tokenizer (loss.cross_tokenizer is set)")
    if session.teacher is None:
        raise ConfigError("kl-profile computes the exact KL from the teacher's logits, and this config's teacher is a "
                          "server (teacher.url), which returns sampled-token log-probs only: drop teacher.url")
    return kl_profile(session.student, session.teacher, session.tokenizer, session.prompt_ids,
                      vocab_size=session.vocab_size, **kwargs)


def _stack(values: Sequence[dict[str, torch.Tensor]], batches: Sequence[Rollouts]) -> tuple[dict, torch.Tensor]:
    """Per-token values and masks of all batches as (B, R_max) tensors, padded with 0 / False."""
    R = max(b.response_mask_B_R.shape[1] for b in batches)
    pad = lambda x: torch.nn.functional.pad(x, (0, R - x.shape[1]))
    return ({q: torch.cat([pad(v[q]) for v in values]) for q in QUANTITIES},
            torch.cat([pad(b.response_mask_B_R) for b in batches]))


def summarize_profile(values_B_R: dict[str, torch.Tensor], mask_B_R: torch.Tensor, *, share: float,
                      bucket: int) -> KLProfile:
    """Per-position and per-bucket statistics, C(t) and N from per-token values (pure; no model involved)."""
    positions = {q: position_stats(values_B_R[q], mask_B_R) for q in QUANTITIES}
    cumulative = cumulative_share(positions["kl"].mean_T)
    mass_T = (values_B_R["kl"].double() * mask_B_R).sum(dim=0).numpy()
    return KLProfile(
        positions=positions, buckets={q: bucket_stats(values_B_R[q], mask_B_R, bucket) for q in QUANTITIES},
        cumulative_T=cumulative, cumulative_mass_T=cumulative_share(mass_T),
        recommended_n=horizon_rule(mass_T, share), recommended_n_position=recommend_n(cumulative, share),
        share=share, bucket=bucket,
        values_B_R=values_B_R, mask_B_R=mask_B_R, rollouts=(),
    )



def top_k_share(kl_B_R: torch.Tensor, mask_B_R: torch.Tensor, k: int) -> dict[str, float]:
    """Share of each rollout's KL held by its k highest-KL alive tokens (module docstring): ``mean`` over rollouts
    with any KL, ``pooled`` over all of them, and ``tokens``: the mean share of alive tokens kept."""
    kl = torch.where(mask_B_R.bool(), kl_B_R.double(), torch.zeros((), dtype=torch.float64))
    top_B = kl.topk(min(k, kl.shape[1]), dim=1).values.sum(dim=1)  # KL >= 0, so dead (0) slots never outrank
    total_B, alive_B = kl.sum(dim=1), mask_B_R.sum(dim=1).double()
    has = total_B > 0
    return {"k": k, "mean": float((top_B[has] / total_B[has]).mean()) if has.any() else float("nan"),
            "pooled": float(top_B.sum() / total_B.sum()) if has.any() else float("nan"),
            "tokens": float((k / alive_B[alive_B > 0]).clamp(max=1.0).mean()) if (alive_B > 0).any() else 0.0}


def profile_summary(profile: KLProfile) -> dict[str, Any]:
    """What ``kl_profile.json`` holds: settings, N, C(t) at a few positions, per-bucket statistics, timings."""
    mask = profile.mask_B_R
    lengths = mask.sum(dim=1).double()
    kl = profile.values_B_R["kl"].double()
    at = {str(t): float(profile.cumulative_T[t - 1]) for t in (10, 25, 50, 100, 200, 300, 500)
          if t <= len(profile.cumulative_T)}
    buckets = {q: [dataclasses.asdict(b) for b in bs] for q, bs in profile.buckets.items()}
    return {
        "recommended_n": profile.recommended_n, "rule": RULE, "rule_text": RULE_TEXT, "share": profile.share,
        "recommended_n_position": profile.recommended_n_position,
        "cumulative_kl_at": at, "token_mean_kl": float(kl.sum() / mask.sum()) if mask.any() else 0.0,
        "top_k_kl_share": [top_k_share(kl, mask, k) for k in (50, 100, 200)],
        "response_length": {"mean": float(lengths.mean()), "p50": float(lengths.median()), "max": int(lengths.max())},
        "cut_share": float(torch.cat([b.cut_B for b in profile.rollouts]).float().mean()) if profile.rollouts else 0.0,
        "settings": profile.settings, "seconds": profile.seconds, "bucket": profile.bucket, "buckets": buckets,
        "positions_csv": "kl_profile.csv",
        "note": "positions are 1-based; recommended_n: the token-mass rule (rule_text; the rule rollout.horizon=auto "
                "applies); recommended_n_position: the same with m(u) = mean KL over the rollouts alive at u instead "
                "of the sum (each position weighs the same). cumulative_kl_at: C(t) of the position-weighted m(u).",
    }


def write_profile(profile: KLProfile, out_dir: str | Path) -> dict[str, Path]:
    """Write ``kl_profile.json``, ``kl_profile.csv`` (one row per position) and ``kl_profile.png`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "kl_profile.json", "csv": out / "kl_profile.csv", "png": out / "kl_profile.png"}
    (tmp := out / ".kl_profile.json.tmp").write_text(json.dumps(profile_summary(profile), indent=2), encoding="utf-8")
    tmp.replace(paths["json"])
    header = ["position", "alive", *[f"{q}_{s}" for q in QUANTITIES for s in STATS], "cumulative_kl",
              "cumulative_kl_mass"]
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for t in range(len(profile.cumulative_T)):
            stats = [getattr(profile.positions[q], f"{s}_T")[t] for q in QUANTITIES for s in STATS]
            writer.writerow([t + 1, int(profile.positions["kl"].alive_T[t]), *[f"{v:.6g}" for v in stats],
                             f"{profile.cumulative_T[t]:.6g}", f"{profile.cumulative_mass_T[t]:.6g}"])
    plot_kl_profile(profile, paths["png"])
    return paths


def plot_kl_profile(profile: KLProfile, path: str | Path) -> Path:
    """The paper's figure: per-position reverse KL, student entropy and teacher entropy (bucket means; bands: p25-p75
    over rollouts of each rollout's bucket mean) against the position, the cumulative KL share C(t) on a twin axis,
    N marked."""
    fig, ax = new_figure(width=8.0, height=4.5)
    names = {"kl": "reverse KL(p_s || p_t)", "student_entropy": "student entropy H_s",
             "teacher_entropy": "teacher entropy H_t"}
    colors = {"kl": COLORS["kl"], "student_entropy": COLORS["student"], "teacher_entropy": COLORS["teacher"]}
    for q, label in names.items():
        bs = profile.buckets[q]
        x = [(b.start + b.stop) / 2 for b in bs]
        line_with_band(ax, x, [b.mean for b in bs], [b.rollout_p25 for b in bs], [b.rollout_p75 for b in bs],
                       label=label, color=colors[q])
    ax.set_xlabel(f"response position t (tokens; means over buckets of {profile.bucket}, bands: p25-p75 over "
                  f"rollouts)")
    ax.set_ylabel("nats")
    twin = ax.twinx()
    t = range(1, len(profile.cumulative_T) + 1)
    twin.plot(t, profile.cumulative_mass_T, color=COLORS["cumulative"], linestyle="--",
              label="cumulative KL mass share C_M(t) (the rule)")
    twin.plot(t, profile.cumulative_T, color=COLORS["cumulative"], linestyle=":", alpha=0.5,
              label="position-weighted C(t)")
    twin.set_ylim(0, 1.02)
    twin.set_ylabel("cumulative KL share C(t)")
    if profile.recommended_n is not None:
        ax.axvline(profile.recommended_n, color=COLORS["mark"], linestyle=":", linewidth=1.5,
                   label=f"N = {profile.recommended_n} (token mass C_M(N) >= {profile.share:.0%})")
        twin.axhline(profile.share, color=COLORS["mark"], linestyle=":", linewidth=0.8, alpha=0.6)
    alive = int(profile.mask_B_R.shape[0])
    ax.set_title(f"KL profile: {profile.settings.get('student', 'student')} <- "
                 f"{profile.settings.get('teacher', 'teacher')} ({alive} rollouts)")
    lines, labels = ax.get_legend_handles_labels()
    lines2, labels2 = twin.get_legend_handles_labels()
    ax.legend(lines + lines2, labels + labels2, loc="upper right")
    return save_png(fig, path)


def run_kl_profile(
    config: str | Path | Config,
    out_dir: str | Path,
    *,
    rollouts: int = 16,
    max_new_tokens: int = 512,
    share: float = 0.45,
    limit: int | None = None,
    bucket: int = 10,
    batch_size: int = 8,
    progress: bool = True,
) -> KLProfile:
    """Profile the config's student/teacher pair on its ``data`` prompts and write the outputs to ``out_dir``.

    Uses ``data`` (its first min(data.limit, limit, rollouts) prompts in source order, cycled up to ``rollouts``),
    ``rollout.temperature`` / ``top_p``, ``loss.chunk_size``, ``seed``, ``train.device`` / ``dtype``. Raises
    ConfigError for a cross-tokenizer pair.
    """
    from esr.data import load_prompts, tokenize_prompts

    cfg = as_config(config)
    pair = load_pair(cfg, "kl-profile")
    n_prompts = min(x for x in (cfg.data.limit, limit, rollouts) if x is not None)
    data = type(cfg.data)(**{**cfg.data.__dict__, "limit": n_prompts})
    prompt_ids = tokenize_prompts(load_prompts(data).prompts, pair.tokenizer, cfg.data.max_prompt_tokens).ids
    r = cfg.rollout
    profile = kl_profile(pair.student, pair.teacher, pair.tokenizer, prompt_ids, rollouts=rollouts,
                         max_new_tokens=max_new_tokens, temperature=r.temperature, top_p=r.top_p, share=share,
                         bucket=bucket, seed=cfg.seed, vocab_size=pair.vocab_size, batch_size=batch_size,
                         chunk_size=cfg.loss.chunk_size, progress=progress)
    profile.settings.update(student=cfg.student.name, teacher=cfg.teacher.name, data=cfg.data.source)
    write_profile(profile, out_dir)
    return profile
