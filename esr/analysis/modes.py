"""Where do the student and the teacher disagree most, and how long do they answer? (mode analysis, Table 4)

Every model (the base student, the teacher, each run's trained student) samples one rollout per held-out prompt
(``rollout_scores.heldout_prompts`` of the FIRST run's config; the same prompts, seed and sampling settings for all).

(a) Modes, on each student's own rollouts scored against the teacher: take the ``top_share`` highest-KL tokens
    (the ceil(top_share * n) largest KL_B_R over all n response tokens) and, at those positions, compare the student's
    top-1 token s1 = argmax_v p_s(v) with the teacher's ranking:

        top1_match   = share with s1 == teacher's top-1
        teacher_2_5  = share with s1 among the teacher's ranks 2..5
        outside_top5 = share with s1 not in the teacher's top 5          (the three shares sum to 1)
        student_top1_prob = mean p_s(s1) on those tokens   (a confident student that disagrees: mode collapse)

    The base student gets the same row, as the reference the trained students are compared with.
(b) Response lengths: p10 / p50 / p90 / mean / max (``esr.eval.metrics.length_stats``) and the share of rollouts cut
    at ``max_new_tokens`` (their true length is longer), for every model.

    result = run_modes(["runs/esr-...", "runs/full-..."], "runs/compare")      # writes modes.json, modes.md

Rows are reused: when ``out_dir``/modes.json was made with the same sampling (``Sampling``), a model whose row it
holds (same name and spec, a checkpoint not written since) is not sampled again, so adding one run to a finished
comparison costs that run alone (``reuse=False``: redo every row).
"""

from __future__ import annotations

import gc
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from esr.analysis.rollout_scores import (
    AnalysisError,
    PairScores,
    check_same_tokenizer,
    heldout_prompts,
    json_safe,
    load_for_analysis,
    load_run_config,
    phase,
    resolve_checkpoint,
    sample_rollouts,
    score_rollouts,
)
from esr.config import Config
from esr.eval.metrics import length_stats
from esr.models.pair import shared_vocab_size
from esr.types import Rollouts


@dataclass
class ModelRow:
    name: str
    """``base student``, ``teacher`` or ``<run folder>/<checkpoint>``."""
    spec: str
    lengths: dict[str, float]
    """length_stats of the response lengths plus ``cut_share``."""
    modes: dict[str, float] | None
    """Mode shares on the top-KL tokens (None for the teacher)."""


@dataclass
class ModesResult:
    rollouts: int
    max_new_tokens: int
    top_share: float
    prompts: str
    rows: list[ModelRow]
    seconds: dict[str, float] = field(default_factory=dict)
    seed: int = 1234
    temperature: float | None = None
    top_p: float | None = None
    prompt_keys: list[str] | None = None
    """The held-out prompts' source ids (None in files written before they were recorded)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def sampling(self) -> dict[str, Any]:
        """What a row depends on besides its model: rows of two results with equal sampling() are comparable."""
        return {k: getattr(self, k) for k in ("rollouts", "max_new_tokens", "top_share", "prompts", "seed",
                                               "temperature", "top_p", "prompt_keys")}


def reusable_rows(path: Path, wanted: ModesResult) -> dict[tuple[str, str], ModelRow]:
    """Rows of an earlier modes.json at ``path`` made with ``wanted``'s sampling, keyed by (name, spec); a row whose
    spec is a checkpoint folder written after the file is left out. Fields the file lacks (older files) are not
    compared."""
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    for key, value in wanted.sampling().items():
        if key in old and old[key] is not None and old[key] != value:
            return {}
    made = path.stat().st_mtime
    rows = {}
    for r in old["rows"]:
        spec = Path(r["spec"])
        if spec.exists() and spec.stat().st_mtime > made:
            continue
        rows[(r["name"], r["spec"])] = ModelRow(r["name"], r["spec"], r["lengths"], r["modes"])
    return rows


def mode_shares(student_top1_N: torch.Tensor, teacher_topk_N_K: torch.Tensor) -> dict[str, float]:
    """Shares of N tokens whose student top-1 id is the teacher's top-1, in its ranks 2..5, or outside its top 5."""
    if student_top1_N.numel() == 0:
        return {"top1_match": math.nan, "teacher_2_5": math.nan, "outside_top5": math.nan}
    top5 = teacher_topk_N_K[:, :5]
    hit_N_K = top5 == student_top1_N.unsqueeze(1)
    first, rest = hit_N_K[:, 0], hit_N_K[:, 1:].any(dim=1) & ~hit_N_K[:, 0]
    n = float(student_top1_N.numel())
    return {"top1_match": float(first.sum()) / n, "teacher_2_5": float(rest.sum()) / n,
            "outside_top5": float((~hit_N_K.any(dim=1)).sum()) / n}


def top_share_mask(kl_B_R: torch.Tensor, mask_B_R: torch.Tensor, share: float) -> torch.Tensor:
    """Bool (B, R): the ceil(share * n) valid tokens of highest KL (n = valid tokens; ties broken by topk)."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"top_share must be in (0, 1], got {share}")
    flat_kl, flat_mask = kl_B_R.flatten(), mask_B_R.flatten().bool()
    k = math.ceil(share * int(flat_mask.sum()))
    picked = torch.zeros_like(flat_mask)
    if k > 0:
        scores = torch.where(flat_mask, flat_kl.double(), torch.full_like(flat_kl, -math.inf, dtype=torch.float64))
        picked[scores.topk(k).indices] = True
    return picked.view_as(mask_B_R)


def mode_stats(scores: PairScores, top_share: float) -> dict[str, float]:
    """Module docstring (a): shares, mean student top-1 prob and mean KL on the top-KL tokens, and their count."""
    pick = top_share_mask(scores.kl_B_R, scores.mask_B_R, top_share)
    shares = mode_shares(scores.student_topk_ids_B_R_K[pick][:, 0], scores.teacher_topk_ids_B_R_K[pick])
    n = int(pick.sum())
    return {
        **shares,
        "student_top1_prob": float(scores.student_top1_prob_B_R[pick].mean()) if n else math.nan,
        "mean_kl_top": float(scores.kl_B_R[pick].mean()) if n else math.nan,
        "mean_kl_all": float(scores.kl_B_R[scores.mask_B_R].mean()) if scores.mask_B_R.any() else math.nan,
        "tokens": n,
    }


def rollout_lengths(rollouts: Rollouts) -> dict[str, float]:
    """length_stats of the response lengths (EOS included) and the share of rollouts cut at the horizon."""
    return {**length_stats(rollouts.lengths_B.tolist()), "cut_share": float(rollouts.cut_B.float().mean())}


def run_modes(
    run_dirs: list[str | Path], out_dir: str | Path, *, rollouts: int = 16, max_new_tokens: int = 512,
    top_share: float = 0.10, seed: int = 1234, checkpoint: str | int = "last", reuse: bool = True,
    progress: bool = True,
) -> ModesResult:
    """Mode shares and length percentiles of base student, teacher and each run's ``checkpoint``; writes
    ``out_dir``/modes.json and modes.md. All runs must share the student and teacher of the first. With ``reuse``
    the rows of an earlier modes.json in ``out_dir`` made with the same sampling are kept (module docstring)."""
    if not run_dirs:
        raise AnalysisError("run_modes needs at least one run folder")
    cfgs = [load_run_config(d) for d in run_dirs]
    cfg = cfgs[0]
    for d, c in zip(run_dirs[1:], cfgs[1:], strict=True):
        if (c.student.name, c.teacher.name) != (cfg.student.name, cfg.teacher.name):
            raise AnalysisError(f"{d} distils {c.student.name} <- {c.teacher.name}, but {run_dirs[0]} distils "
                                f"{cfg.student.name} <- {cfg.teacher.name}: compare runs of one pair")
    check_same_tokenizer(cfg.student.name, cfg.teacher.name)
    ckpts = [resolve_checkpoint(d, checkpoint) for d in run_dirs]
    seconds: dict[str, float] = {}
    with phase("load teacher", seconds, progress):
        teacher, teacher_tok = load_for_analysis(cfg.teacher.name, cfg)
        held = heldout_prompts(cfg, teacher_tok, rollouts)
    result = ModesResult(rollouts, max_new_tokens, top_share, held.how, [], seed=seed,
                         temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, prompt_keys=list(held.ids))
    old = reusable_rows(Path(out_dir) / "modes.json", result) if reuse else {}
    if old and progress:
        print(f"modes: reusing {len(old)} row(s) of {Path(out_dir) / 'modes.json'}", file=sys.stderr)
    teacher_row = old.get(("teacher", cfg.teacher.name))
    if teacher_row is None:
        with phase("sample teacher", seconds, progress):
            teacher_ro = sample_rollouts(teacher, teacher_tok, cfg, held.prompt_ids, max_new_tokens, seed)
        teacher_row = ModelRow("teacher", cfg.teacher.name, rollout_lengths(teacher_ro), None)
    students = [("base student", cfg.student.name)]
    students += [(f"{Path(d).name}/{c.name}", str(c)) for d, c in zip(run_dirs, ckpts, strict=True)]
    rows = [old.get((name, spec)) or _student_row(name, spec, teacher, cfg, held.prompt_ids, max_new_tokens, seed,
                                                  top_share, seconds, progress) for name, spec in students]
    result.rows = [rows[0], teacher_row, *rows[1:]]
    result.seconds = {k: round(v, 2) for k, v in seconds.items()}
    write_modes(result, Path(out_dir))
    return result


def _student_row(
    name: str, spec: str, teacher: torch.nn.Module, cfg: Config, prompt_ids: tuple[tuple[int, ...], ...],
    max_new_tokens: int, seed: int, top_share: float, seconds: dict[str, float], progress: bool,
) -> ModelRow:
    """Load one student, sample on the held-out prompts, score against the teacher, free it."""
    with phase(f"load {name}", seconds, progress):
        student, tokenizer = load_for_analysis(spec, cfg)
    with phase(f"sample {name}", seconds, progress):
        ro = sample_rollouts(student, tokenizer, cfg, prompt_ids, max_new_tokens, seed)
    with phase(f"score {name}", seconds, progress):
        scores = score_rollouts(student, teacher, ro, shared_vocab_size(student, teacher, tokenizer),
                                chunk=cfg.loss.chunk_size)
    del student
    gc.collect()
    return ModelRow(name, spec, rollout_lengths(ro), mode_stats(scores, top_share))


def write_modes(result: ModesResult, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "modes.json").write_text(json.dumps(json_safe(result.to_json()), indent=2))
    (out_dir / "modes.md").write_text(modes_markdown(result))


def modes_markdown(result: ModesResult) -> str:
    """Two tables: response lengths of every model (the paper's Table 4) and the mode shares of the students."""
    lines = [f"# Modes and lengths ({result.rollouts} held-out prompts, {result.max_new_tokens} new tokens max)", "",
             f"Prompts: {result.prompts}.", "", "| model | p10 | p50 | p90 | mean | max | cut at max |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        s = r.lengths
        lines.append(f"| {r.name} | {s['p10']:.0f} | {s['p50']:.0f} | {s['p90']:.0f} | {s['mean']:.1f} | "
                     f"{s['max']:.0f} | {100 * s['cut_share']:.0f}% |")
    lines += ["", f"Top {100 * result.top_share:.0f}% highest-KL tokens of each student's own rollouts: where the "
              "student's top-1 token sits in the teacher's ranking.", "",
              "| model | tokens | top-1 match | teacher rank 2-5 | outside teacher top 5 | student top-1 p | "
              "mean KL (top) | mean KL (all) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        if r.modes is None:
            continue
        m = r.modes
        lines.append(f"| {r.name} | {m['tokens']} | {_pct(m['top1_match'])} | {_pct(m['teacher_2_5'])} | "
                     f"{_pct(m['outside_top5'])} | {m['student_top1_prob']:.3f} | {m['mean_kl_top']:.3f} | "
                     f"{m['mean_kl_all']:.3f} |")
    return "\n".join(lines) + "\n"


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"
