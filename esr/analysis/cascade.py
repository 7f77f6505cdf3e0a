"""Does training on the first N tokens lower the KL beyond N too? (the ESR paper's cascade analysis)

On held-out prompts (``rollout_scores.heldout_prompts``: for gsm_symbolic a fresh generator seed, else the last
prompts the run never drew) the BASE student (config ``student.name``) and the TRAINED student (a checkpoint) each
sample one rollout per prompt with the same seed, at the run's temperature, and every sampled token is scored
against the teacher:

    before[r] = mean_{b alive at r} KL_base_b[r],     after[r] = mean_{b alive at r} KL_trained_b[r]

("alive at r": the rollout has a token at position r). The drop over a range of positions [a, c) is

    drop[a, c) = 100 * (1 - mean_{r in S} after[r] / mean_{r in S} before[r]),   S = {r in [a, c): both defined},

every position weighted EQUALLY (not by how many rollouts are alive there: the two models stop at different
lengths, and a token-weighted mean would mix that into the comparison). Reported inside the trained window [0, N)
and beyond it [N, max_new_tokens); N is the run's ``rollout.n`` when ``rollout.horizon == "esr"``, else the ``n``
argument. The paper saw a 30-40% drop beyond N. As a second opinion the JSON also has the token-weighted drop,

    drop_tokens[a, c) = 100 * (1 - sum_r alive_after[r] after[r] / sum_r alive_after[r]
                                 / (sum_r alive_before[r] before[r] / sum_r alive_before[r])),   r in [a, c),

the mean over every scored token in the range; it leans less on late positions where few rollouts are alive.

    result = run_cascade("runs/quickstart-...")        # writes runs/quickstart-.../analysis/cascade.{json,png}
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from esr.analysis.rollout_scores import (
    AnalysisError,
    check_same_tokenizer,
    heldout_prompts,
    json_safe,
    load_for_analysis,
    load_run_config,
    nan_to_none,
    phase,
    resolve_checkpoint,
    sample_rollouts,
    score_rollouts,
)
from esr.models.pair import shared_vocab_size
from esr.plots import COLORS, new_figure, save_png


@dataclass
class CascadeResult:
    run_dir: str
    checkpoint: str
    n: int
    """The trained window: positions [0, n)."""
    max_new_tokens: int
    rollouts: int
    prompts: str
    """How the held-out prompts were chosen."""
    drop_in_pct: float | None
    """KL drop inside [0, n) in percent (module docstring); None when undefined."""
    drop_beyond_pct: float | None
    """KL drop over [n, max_new_tokens) in percent."""
    drop_in_pct_tokens: float | None
    """Token-weighted KL drop inside [0, n) in percent (module docstring)."""
    drop_beyond_pct_tokens: float | None
    means: dict[str, float | None]
    """Position-weighted mean KL: before_in, after_in, before_beyond, after_beyond."""
    mean_length: dict[str, float]
    """Mean response length of the base and trained students' rollouts."""
    before: list[float | None]
    """Per-position mean KL of the base student (None where no rollout is alive)."""
    after: list[float | None]
    alive_before: list[int]
    alive_after: list[int]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def per_position_mean(kl_B_R: torch.Tensor, mask_B_R: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean_R, alive_R)`` over ``length`` positions: mean KL of the rollouts alive at r (NaN where none is)."""
    kl, alive = torch.zeros(length, dtype=torch.float64), torch.zeros(length, dtype=torch.long)
    R = min(length, kl_B_R.shape[1])
    m = mask_B_R[:, :R].bool()
    kl[:R] = (kl_B_R[:, :R].double() * m).sum(dim=0)
    alive[:R] = m.sum(dim=0)
    mean = torch.where(alive > 0, kl / alive.clamp(min=1), torch.full_like(kl, math.nan))
    return mean, alive


def range_means(before_R: torch.Tensor, after_R: torch.Tensor, start: int, stop: int) -> tuple[float, float]:
    """Equal-weight means of the two curves over positions r in [start, stop) where both are defined (NaN if none)."""
    b, a = before_R[start:stop].double(), after_R[start:stop].double()
    both = ~(b.isnan() | a.isnan())
    if not both.any():
        return math.nan, math.nan
    return float(b[both].mean()), float(a[both].mean())


def kl_drop(before_R: torch.Tensor, after_R: torch.Tensor, start: int, stop: int) -> float:
    """100 * (1 - mean after / mean before) over [start, stop) (see ``range_means``); NaN when undefined."""
    mean_b, mean_a = range_means(before_R, after_R, start, stop)
    if math.isnan(mean_b) or mean_b == 0:
        return math.nan
    return 100.0 * (1.0 - mean_a / mean_b)


def kl_drop_tokens(
    before_R: torch.Tensor, alive_before_R: torch.Tensor, after_R: torch.Tensor, alive_after_R: torch.Tensor,
    start: int, stop: int,
) -> float:
    """Token-weighted drop over [start, stop): each curve averaged with its alive counts as weights (NaN: undefined)."""
    means = []
    for mean_R, alive_R in ((before_R, alive_before_R), (after_R, alive_after_R)):
        m, n = mean_R[start:stop].double(), alive_R[start:stop].double()
        total = float(n.sum())
        means.append(float(torch.where(n > 0, m * n, torch.zeros_like(m)).sum()) / total if total else math.nan)
    mean_b, mean_a = means
    if math.isnan(mean_b) or math.isnan(mean_a) or mean_b == 0:
        return math.nan
    return 100.0 * (1.0 - mean_a / mean_b)


def trained_window(cfg_horizon: str, cfg_n: int, n: int | None) -> int:
    """N: the ``n`` argument when given, else the run's ``rollout.n`` for an ESR run; other horizons need ``n``."""
    if n is not None:
        return n
    if cfg_horizon == "esr":
        return cfg_n
    raise AnalysisError(f"the run's rollout.horizon is {cfg_horizon!r}, not 'esr': pass n (the window to compare)")


def run_cascade(
    run_dir: str | Path, out_dir: str | Path | None = None, *, checkpoint: str | int = "last", rollouts: int = 16,
    max_new_tokens: int = 512, seed: int = 1234, n: int | None = None, progress: bool = True,
) -> CascadeResult:
    """Per-position KL of the base and the trained student on held-out prompts; writes cascade.json and .png.

    ``out_dir`` defaults to ``run_dir/analysis``. One rollout per held-out prompt (``rollouts`` prompts), both
    students sampled with ``seed``.
    """
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    N = trained_window(cfg.rollout.horizon, cfg.rollout.n, n)
    check_same_tokenizer(cfg.student.name, cfg.teacher.name)
    seconds: dict[str, float] = {}
    with phase("load teacher", seconds, progress):
        teacher, _ = load_for_analysis(cfg.teacher.name, cfg)
    curves, lengths = {}, {}
    for label, spec in (("before", cfg.student.name), ("after", str(ckpt))):
        with phase(f"load {label}", seconds, progress):
            student, tokenizer = load_for_analysis(spec, cfg)
            held = heldout_prompts(cfg, tokenizer, rollouts)
        with phase(f"sample {label}", seconds, progress):
            ro = sample_rollouts(student, tokenizer, cfg, held.prompt_ids, max_new_tokens, seed)
        with phase(f"score {label}", seconds, progress):
            scores = score_rollouts(student, teacher, ro, shared_vocab_size(student, teacher, tokenizer),
                                    chunk=cfg.loss.chunk_size)
        curves[label] = per_position_mean(scores.kl_B_R, scores.mask_B_R, max_new_tokens)
        lengths[label] = float(scores.lengths_B.float().mean())
        del student
        gc.collect()
    result = _result(run_dir, ckpt, N, max_new_tokens, rollouts, held.how, curves, lengths, seconds)
    write_cascade(result, Path(out_dir) if out_dir is not None else run_dir / "analysis")
    return result


def _result(
    run_dir: Path, ckpt: Path, N: int, T: int, rollouts: int, how: str,
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]], lengths: dict[str, float], seconds: dict[str, float],
) -> CascadeResult:
    (before, alive_b), (after, alive_a) = curves["before"], curves["after"]
    b_in, a_in = range_means(before, after, 0, N)
    b_out, a_out = range_means(before, after, N, T)
    return CascadeResult(
        run_dir=str(run_dir), checkpoint=ckpt.name, n=N, max_new_tokens=T, rollouts=rollouts, prompts=how,
        drop_in_pct=nan_to_none(kl_drop(before, after, 0, N)),
        drop_beyond_pct=nan_to_none(kl_drop(before, after, N, T)),
        drop_in_pct_tokens=nan_to_none(kl_drop_tokens(before, alive_b, after, alive_a, 0, N)),
        drop_beyond_pct_tokens=nan_to_none(kl_drop_tokens(before, alive_b, after, alive_a, N, T)),
        means={"before_in": nan_to_none(b_in), "after_in": nan_to_none(a_in),
               "before_beyond": nan_to_none(b_out), "after_beyond": nan_to_none(a_out)},
        mean_length={"base": lengths["before"], "trained": lengths["after"]},
        before=[nan_to_none(float(x)) for x in before], after=[nan_to_none(float(x)) for x in after],
        alive_before=alive_b.tolist(), alive_after=alive_a.tolist(),
        seconds={k: round(v, 2) for k, v in seconds.items()},
    )


def write_cascade(result: CascadeResult, out_dir: Path) -> None:
    """cascade.json (the whole result) and cascade.png (the two curves, trained window shaded)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "cascade.json").write_text(json.dumps(json_safe(result.to_json()), indent=2))
    plot_cascade(result, out_dir / "cascade.png")


def _smooth(values: list[float | None], window: int) -> list[float]:
    """Centered moving average ignoring undefined points (NaN where the whole window is undefined)."""
    x = [math.nan if v is None else v for v in values]
    out = []
    for i in range(len(x)):
        part = [v for v in x[max(0, i - window // 2) : i + window // 2 + 1] if not math.isnan(v)]
        out.append(sum(part) / len(part) if part else math.nan)
    return out


def plot_cascade(result: CascadeResult, path: Path) -> None:
    """Per-position mean KL before/after (raw, faint; smoothed, bold), window [0, N) shaded."""
    fig, ax = new_figure(width=8.0, height=4.5)
    positions = list(range(len(result.before)))
    window = max(1, len(positions) // 50)
    for label, values, color in (("base student", result.before, COLORS["kl"]),
                                 ("trained student", result.after, COLORS["student"])):
        raw = [math.nan if v is None else v for v in values]
        ax.plot(positions, raw, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(positions, _smooth(values, window), color=color, linewidth=1.8, label=f"{label} ({window}-pos mean)")
    ax.axvspan(0, result.n, color=COLORS["teacher"], alpha=0.12, label=f"trained window [0, {result.n})")
    drops = f"KL drop in window {_pct(result.drop_in_pct)}, beyond {_pct(result.drop_beyond_pct)}"
    ax.set(xlabel="response position", ylabel="mean reverse KL (alive rollouts)",
           title=f"KL cascade: {result.checkpoint} vs base student ({drops})")
    ax.legend()
    save_png(fig, path)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}%"
