"""Which tokens carry the student-teacher disagreement? Mean KL by token category, by position range, by token.

A model samples one rollout per held-out prompt (``rollout_scores.heldout_prompts``) and every response token is
scored against the teacher. The KL at position r, KL(p_s || p_t) of the distributions that chose token y_r, is
attributed to the sampled token y_r. Every aggregate is a token-weighted mean:

    mean_KL(group) = sum_{(b, r) in group} KL_b[r] / |group|

with groups: the categories of ``token_category`` (on the decoded token text), the position ranges
``POSITION_BINS`` (0-4, 5-19, 20-49, 50-99, 100-199, 200-499, 500+), and the decoded token strings seen at least
``min_count`` times (the ``top`` highest means are reported). ``share_kl`` of a category is its part of the total KL.

    run_token_analysis("runs/quickstart-...", "runs/quickstart-.../analysis")       # trained student (last ckpt)
    run_token_analysis("qwen2.5-coder-0.5b-instruct", "out", teacher="qwen2.5-coder-1.5b-instruct")   # a base model
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from esr.analysis.rollout_scores import (
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
from esr.config import Config, ModelConfig, TeacherConfig
from esr.models.pair import shared_vocab_size
from esr.plots import COLORS, new_figure, save_png

CATEGORIES = ("planning", "structural", "number", "operator", "latex", "special", "continuation")
PLANNING_WORDS = frozenset({
    "first", "second", "third", "next", "then", "now", "so", "therefore", "thus", "hence", "finally", "let", "let's",
    "we", "need", "wait", "step", "steps", "since", "because", "however", "but", "alternatively", "recall", "check",
    "verify", "calculate", "compute", "find", "determine", "start", "begin", "given", "suppose", "assume", "note",
    "hmm", "okay", "ok", "answer",
})
"""Discourse and planning words (compared lower-case, whole token): the tokens that steer a solution."""
POSITION_BINS: tuple[tuple[int, int | None], ...] = ((0, 5), (5, 20), (20, 50), (50, 100), (100, 200), (200, 500),
                                                     (500, None))
"""[start, stop) ranges of 0-based response positions; None: open-ended."""
_SPACE_MARKERS = " \u0120\u2581"  # plain space, byte-level BPE's "Ġ", SentencePiece's "▁"
_MARKDOWN = re.compile(r"\*{2,}|#{1,6}|-{2,}|`+|\|+|_{2,}|={3,}")
_OPERATOR = re.compile(r"[+\-*/=<>^×÷·±≤≥≠−]+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_SPECIAL = re.compile(r"<\|[^|<>]+\|>|</?s>|<(?:start|end)_of_turn>|<eos>|<bos>|<pad>")


def token_category(token_text: str) -> str:
    """The category of one decoded token, first rule that matches (leading space markers stripped first):

    structural: only whitespace (newlines included), a markdown mark ("**", "#".."######", "--"+, "`", "|", "__"),
                or no letter or digit at all (".", ",", ":", "(", "):")
    latex:      contains a backslash or "$", or only braces ("{", "}}")
    operator:   only + - * / = < > ^ (and × ÷ · ± ≤ ≥ ≠ −); a lone "-" counts as minus, "--" as markdown
    number:     digits, with "." or "," between digit groups ("3", "2.50", "1,000")
    special:    chat / tokenizer markers ("<|im_end|>", "</s>", "<end_of_turn>")
    planning:   a word of PLANNING_WORDS (case-insensitive, whole token: "First", " So", "wait")
    continuation: everything else (word pieces, names, units)
    """
    core = token_text.lstrip(_SPACE_MARKERS).strip()
    if not core or _MARKDOWN.fullmatch(core):
        return "structural"
    if "\\" in core or "$" in core or set(core) <= {"{", "}"}:
        return "latex"
    if _OPERATOR.fullmatch(core):
        return "operator"
    if _NUMBER.fullmatch(core):
        return "number"
    if _SPECIAL.fullmatch(core):
        return "special"
    if core.lower() in PLANNING_WORDS:
        return "planning"
    if not any(ch.isalnum() for ch in core):
        return "structural"
    return "continuation"


def bin_label(start: int, stop: int | None) -> str:
    return f"{start}+" if stop is None else f"{start}-{stop - 1}"


def position_range_means(
    kl_B_R: torch.Tensor, mask_B_R: torch.Tensor, bins: Sequence[tuple[int, int | None]] = POSITION_BINS,
) -> list[dict[str, Any]]:
    """Per range [start, stop): ``{"range", "tokens", "mean_kl"}``, the token-weighted mean (NaN when empty)."""
    rows = []
    for start, stop in bins:
        kl, m = kl_B_R[:, start:stop].double(), mask_B_R[:, start:stop].bool()
        n = int(m.sum())
        rows.append({"range": bin_label(start, stop), "tokens": n,
                     "mean_kl": float(kl[m].sum()) / n if n else math.nan})
    return rows


def category_means(categories: Sequence[str], kls: Sequence[float]) -> list[dict[str, Any]]:
    """Per category of CATEGORIES: tokens, share of tokens, mean KL (NaN when absent) and share of the total KL."""
    n, total = len(kls), float(sum(kls))
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for cat, kl in zip(categories, kls, strict=True):
        sums[cat] += kl
        counts[cat] += 1
    return [{"category": c, "tokens": counts[c], "share_tokens": counts[c] / n if n else math.nan,
             "mean_kl": sums[c] / counts[c] if counts[c] else math.nan,
             "share_kl": sums[c] / total if total else math.nan} for c in CATEGORIES]


def top_tokens(texts: Sequence[str], kls: Sequence[float], top: int, min_count: int = 3) -> list[dict[str, Any]]:
    """The ``top`` token strings of highest mean KL among those seen at least ``min_count`` times (ties: more
    frequent first, then the string)."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for text, kl in zip(texts, kls, strict=True):
        sums[text] += kl
        counts[text] += 1
    rows = [{"token": t, "category": token_category(t), "count": counts[t], "mean_kl": sums[t] / counts[t]}
            for t in counts if counts[t] >= min_count]
    rows.sort(key=lambda r: (-r["mean_kl"], -r["count"], r["token"]))
    return rows[:top]


@dataclass
class TokenAnalysis:
    student: str
    teacher: str
    rollouts: int
    max_new_tokens: int
    prompts: str
    tokens: int
    mean_kl: float
    categories: list[dict[str, Any]]
    positions: list[dict[str, Any]]
    top_tokens: list[dict[str, Any]]
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return json_safe(asdict(self))


def resolve_target(spec_or_run_dir: str | Path, teacher: str | None, checkpoint: str | int) -> tuple[str, Config]:
    """(student spec, config): a run folder gives its ``checkpoint`` and config; a checkpoint folder itself and
    its config.yaml; anything else is a model spec with the default config (data, sampling) and ``teacher``."""
    path = Path(spec_or_run_dir)
    if path.is_dir() and (path / "config.yaml").is_file():
        cfg = load_run_config(path)
        is_checkpoint = (path / "adapter_config.json").is_file() or any(path.glob("*.safetensors"))
        student = str(path) if is_checkpoint else str(resolve_checkpoint(path, checkpoint))
    else:
        cfg, student = Config(), str(spec_or_run_dir)
        cfg = dataclasses.replace(cfg, student=ModelConfig(name=student))
    if teacher is not None:
        cfg = dataclasses.replace(cfg, teacher=TeacherConfig(name=teacher))
    return student, cfg


def run_token_analysis(
    spec_or_run_dir: str | Path, out_dir: str | Path, *, rollouts: int = 16, max_new_tokens: int = 512, top: int = 30,
    teacher: str | None = None, checkpoint: str | int = "last", min_count: int = 3, seed: int = 1234,
    progress: bool = True,
) -> TokenAnalysis:
    """Mean KL by category, position range and token of ``spec_or_run_dir``'s rollouts (``resolve_target``);
    writes tokens.json, tokens.md and tokens.png into ``out_dir``."""
    student_spec, cfg = resolve_target(spec_or_run_dir, teacher, checkpoint)
    check_same_tokenizer(student_spec, cfg.teacher.name)
    seconds: dict[str, float] = {}
    with phase("load models", seconds, progress):
        teacher_model, _ = load_for_analysis(cfg.teacher.name, cfg)
        student, tokenizer = load_for_analysis(student_spec, cfg)
        held = heldout_prompts(cfg, tokenizer, rollouts)
    with phase("sample", seconds, progress):
        ro = sample_rollouts(student, tokenizer, cfg, held.prompt_ids, max_new_tokens, seed)
    with phase("score", seconds, progress):
        scores = score_rollouts(student, teacher_model, ro, shared_vocab_size(student, teacher_model, tokenizer),
                                chunk=cfg.loss.chunk_size)
    mask = scores.mask_B_R
    ids, kls = scores.tokens_B_R[mask].tolist(), scores.kl_B_R[mask].tolist()
    text_of = {i: tokenizer.decode([i]) for i in set(ids)}
    texts = [text_of[i] for i in ids]
    result = TokenAnalysis(
        student=student_spec, teacher=cfg.teacher.name, rollouts=rollouts, max_new_tokens=max_new_tokens,
        prompts=held.how, tokens=len(kls), mean_kl=sum(kls) / len(kls) if kls else math.nan,
        categories=category_means([token_category(t) for t in texts], kls),
        positions=position_range_means(scores.kl_B_R, mask), top_tokens=top_tokens(texts, kls, top, min_count),
        seconds={k: round(v, 2) for k, v in seconds.items()},
    )
    write_tokens(result, Path(out_dir))
    return result


def write_tokens(result: TokenAnalysis, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokens.json").write_text(json.dumps(result.to_json(), indent=2, ensure_ascii=False))
    (out_dir / "tokens.md").write_text(tokens_markdown(result))
    plot_tokens(result, out_dir / "tokens.png")


def _num(x: float, fmt: str = ".3f") -> str:
    return "n/a" if x is None or math.isnan(x) else format(x, fmt)


def tokens_markdown(result: TokenAnalysis) -> str:
    """Three tables: by category, by position range, top tokens."""
    lines = [f"# Token analysis: {result.student} vs teacher {result.teacher}", "",
             f"{result.tokens} response tokens from {result.rollouts} held-out prompts ({result.prompts}), "
             f"mean reverse KL {_num(result.mean_kl)}.", "",
             "| category | tokens | share of tokens | mean KL | share of KL |", "|---|---:|---:|---:|---:|"]
    for r in result.categories:
        lines.append(f"| {r['category']} | {r['tokens']} | {_num(100 * r['share_tokens'], '.1f')}% | "
                     f"{_num(r['mean_kl'])} | {_num(100 * r['share_kl'], '.1f')}% |")
    lines += ["", "| positions | tokens | mean KL |", "|---|---:|---:|"]
    lines += [f"| {r['range']} | {r['tokens']} | {_num(r['mean_kl'])} |" for r in result.positions]
    lines += ["", "| token | category | count | mean KL |", "|---|---|---:|---:|"]
    for r in result.top_tokens:
        shown = json.dumps(r["token"], ensure_ascii=False).replace("|", "\\|")
        lines.append(f"| `{shown}` | {r['category']} | {r['count']} | {_num(r['mean_kl'])} |")
    return "\n".join(lines) + "\n"


def plot_tokens(result: TokenAnalysis, path: Path) -> None:
    """Two bar charts: mean KL per category, and per position range."""
    fig, (ax_c, ax_p) = new_figure(2, width=10.0, height=4.0)
    cats = [r for r in result.categories if r["tokens"]]
    ax_c.bar([r["category"] for r in cats], [r["mean_kl"] for r in cats], color=COLORS["kl"])
    ax_c.set(ylabel="mean reverse KL", title="by token category")
    ax_c.tick_params(axis="x", labelrotation=30)
    pos = [r for r in result.positions if r["tokens"]]
    ax_p.bar([r["range"] for r in pos], [r["mean_kl"] for r in pos], color=COLORS["student"])
    ax_p.set(xlabel="response positions", title="by position range")
    save_png(fig, path)
