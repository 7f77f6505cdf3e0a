"""Decay probe: how far into the student's answer the teacher can still recover, i.e. how long its judgement holds.

For each problem the student (the *prefix source*) samples one answer of up to K = max(ks) tokens, once. For every k
in ``ks`` the teacher (the *continuer*) is given prompt + the student's first k tokens (exact ids, no re-encoding)
and continues, greedy or with ``n`` samples at ``temperature``, for up to ``max_new_tokens`` new tokens (the budget
does not shrink with k, so long prefixes are never cut short for it). A student answer that ended (EOS) within its
first k tokens is kept whole and judged as it is: there is nothing left to continue. The judged text is the decode
of prefix + continuation ids (one decode, so a character split across the boundary survives), scored by the task.

    acc(k)   = avg@n = mean over problems i and samples j of correct(i, j, k)
    Delta(k) = acc(0) - acc(k)          (k = 0 is the teacher alone, so Delta(0) = 0)

Sign convention: Delta(k) > 0 means the k-token student prefix costs the teacher that much accuracy (its judgement
no longer rescues the answer); a Delta that grows with k says supervision past that point is of little use.

Mirror probe (``mirror=True``, from "prefix OPD"): the roles swap; the STUDENT continues k-token TEACHER prefixes,
and Delta(k) = acc(0) - acc(k) is then the student's own accuracy minus its accuracy from a k-token teacher start
(negative: the teacher's opening helps the student).

    run_decay("configs/quickstart.yaml", "runs/decay", ks=(0, 25, 50, 100), limit=8, max_new_tokens=256)
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from esr.analysis.rollout_scores import as_config
from esr.config import Config
from esr.eval.tasks import EvalItem, Task, make_task
from esr.models.pair import load_pair
from esr.plots import COLORS, line_with_band, new_figure, save_png
from esr.progress import progress_bar

log = logging.getLogger("esr.analysis")
DEFAULT_KS = (0, 25, 50, 100, 200, 300)
MAX_CUT_SHARE = 0.1
"""Above this share of continuations cut by max_new_tokens the accuracies measure the budget, not the teacher."""


@dataclass
class DecayResult:
    """Accuracy per prefix length k and the recoverability gap (module docstring); ``records`` has every sample."""

    task: str
    ks: tuple[int, ...]
    accuracy: dict[int, float]
    """acc(k) = avg@n of the continuer from a k-token prefix."""
    gap: dict[int, float]
    """Delta(k) = acc(0) - acc(k)."""
    per_k: dict[int, dict[str, float]]
    """Per k: samples, share of prefixes that were already complete answers, share cut by max_new_tokens, mean
    continuation tokens."""
    mirror: bool
    prefix_source: str
    """Role that wrote the prefixes: ``student`` (mirror: ``teacher``)."""
    continuer: str
    problems: int
    n: int
    records: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def recoverability_gap(accuracy: Mapping[int, float]) -> dict[int, float]:
    """Delta(k) = acc(0) - acc(k) for every k in ``accuracy`` (which must have k = 0)."""
    if 0 not in accuracy:
        raise ValueError("the recoverability gap needs acc(0): include k = 0")
    return {k: accuracy[0] - a for k, a in accuracy.items()}


def accuracy_by_k(records: Sequence[Mapping[str, Any]]) -> dict[int, float]:
    """avg@n per k: the mean of ``correct`` over the records (problems x samples) of each k."""
    groups: dict[int, list[float]] = {}
    for r in records:
        groups.setdefault(int(r["k"]), []).append(float(r["correct"]))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def prefix_for(response_ids: Sequence[int], ended: bool, k: int) -> tuple[list[int], bool]:
    """The first k tokens of a rollout, and whether they already are its whole answer.

    A rollout that ended (EOS, kept) within its first k tokens is returned whole with ``True``; otherwise the first
    k tokens with ``False`` (a rollout cut without EOS is never complete).
    """
    if ended and len(response_ids) <= k:
        return list(response_ids), True
    return list(response_ids[:k]), False


def truncation_warning(per_k: Mapping[int, Mapping[str, float]], max_new_tokens: int) -> str | None:
    """A warning when more than ``MAX_CUT_SHARE`` of some k's continuations hit ``max_new_tokens``: a cut answer is
    judged on its last number, and the cut share changes with k (a longer prefix leaves less to write), which biases
    Delta(k). None when every k is below the threshold."""
    worst = max(per_k, key=lambda k: per_k[k]["cut_share"])
    if per_k[worst]["cut_share"] <= MAX_CUT_SHARE:
        return None
    shares = ", ".join(f"k={k}: {v['cut_share']:.0%}" for k, v in per_k.items())
    return (f"continuations cut by max_new_tokens={max_new_tokens} ({shares}): accuracies are bounded by the budget "
            f"and Delta(k) is biased; raise max_new_tokens until the cut shares are near 0")


def normalize_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Sorted distinct ks with 0 added (Delta needs acc(0)); negative values are an error."""
    if any(int(k) < 0 for k in ks):
        raise ValueError(f"prefix lengths must be >= 0, got {list(ks)}")
    return tuple(sorted({0, *(int(k) for k in ks)}))


def generate(model: nn.Module, tokenizer: Any, contexts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float, seed: int, batch_size: int,
             advance: Callable[[int], None] = lambda _: None) -> list[tuple[list[int], bool]]:
    """Continue every context (token ids) by up to ``max_new_tokens``; returns (new ids, ended with EOS) per context.

    Batches of ``batch_size`` contexts (left-padded), batch b seeded with ``seed + first row``; greedy at 0.
    """
    from esr.rollout.eos import eos_token_ids
    from esr.rollout.sampler import HFSampler

    if max_new_tokens == 0 or not contexts:
        return [([], False) for _ in contexts]
    sampler = HFSampler(model, eos_token_ids=eos_token_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id,
                        temperature=temperature)
    out: list[tuple[list[int], bool]] = []
    for start in range(0, len(contexts), batch_size):
        r = sampler.sample(contexts[start : start + batch_size], max_new_tokens, seed=seed + start)
        for row in range(len(r)):
            out.append((r.response_ids_B_R[row, : int(r.lengths_B[row])].tolist(), not bool(r.cut_B[row])))
        advance(len(r))
    return out


def load_items(task: Task, tokenizer: Any, limit: int | None, max_prompt_tokens: int) -> tuple[list[EvalItem],
                                                                                                 list[list[int]]]:
    """The task's first ``limit`` problems that fit ``max_prompt_tokens``, and their prompt ids (chat template)."""
    from esr.data import DataError, Prompt, tokenize_prompts

    items = task.load(limit)
    if not items:
        raise DataError(f"task {task.name} has no problems for the decay probe")
    tokenized = tokenize_prompts([Prompt(it.id, it.messages, None) for it in items], tokenizer, max_prompt_tokens)
    by_id = {it.id: it for it in items}
    return [by_id[p.id] for p in tokenized.prompts], [list(ids) for ids in tokenized.ids]


def decay_probe(
    prefix_model: nn.Module,
    continuer: nn.Module,
    tokenizer: Any,
    task: Task,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    limit: int | None = 16,
    n: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 384,
    prefix_temperature: float = 0.7,
    seed: int = 0,
    batch_size: int = 8,
    max_prompt_tokens: int = 4096,
    mirror: bool = False,
    progress: bool = False,
) -> DecayResult:
    """Run the probe (module docstring) with models given: ``prefix_model`` writes the prefixes (one rollout per
    problem at ``prefix_temperature``, K = max(ks) tokens), ``continuer`` completes them. Both use ``tokenizer``'s
    ids (check ``require_shared_vocabulary`` first; ``run_decay`` does). ``mirror`` only names the roles."""
    if n < 1 or (temperature == 0 and n > 1):
        raise ValueError(f"n must be >= 1 and greedy decoding (temperature 0) needs n = 1; got n={n}, "
                         f"temperature={temperature}")
    ks = normalize_ks(ks)
    items, prompt_ids = load_items(task, tokenizer, limit, max_prompt_tokens)
    roles = ("teacher", "student") if mirror else ("student", "teacher")
    seconds: dict[str, float] = {}
    with progress_bar(progress) as bar:
        t0 = time.perf_counter()
        bar_p = bar.add_task(f"decay: {roles[0]} prefixes, {ks[-1]} tokens", total=len(items))
        rollouts = generate(prefix_model, tokenizer, prompt_ids, ks[-1], temperature=prefix_temperature,
                            seed=seed * 1_000_003, batch_size=batch_size,
                            advance=lambda m: bar.update(bar_p, advance=m))
        seconds["prefixes"] = time.perf_counter() - t0
        jobs = [(k, i, j, *prefix_for(*rollouts[i], k)) for k in ks for i in range(len(items)) for j in range(n)]
        todo = [job for job in jobs if not job[4]]
        bar_c = bar.add_task(f"decay: {roles[1]} continues ({len(ks)} ks)", total=len(todo))
        t0 = time.perf_counter()
        continued = generate(continuer, tokenizer, [prompt_ids[i] + prefix for _, i, _, prefix, _ in todo],
                             max_new_tokens, temperature=temperature, seed=seed * 1_000_003 + 500_009,
                             batch_size=batch_size, advance=lambda m: bar.update(bar_c, advance=m))
        seconds["continuations"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    records = judge(task, items, tokenizer, jobs, continued)
    seconds["judge"] = time.perf_counter() - t0
    accuracy, per_k = accuracy_by_k(records), per_k_stats(records)
    if warning := truncation_warning(per_k, max_new_tokens):
        log.warning(warning)
    return DecayResult(
        task=task.name, ks=ks, accuracy=accuracy, gap=recoverability_gap(accuracy), per_k=per_k, mirror=mirror,
        prefix_source=roles[0], continuer=roles[1], problems=len(items), n=n, records=records,
        warnings=[warning] if warning else [],
        settings=dict(ks=list(ks), limit=limit, n=n, temperature=temperature, max_new_tokens=max_new_tokens,
                      prefix_temperature=prefix_temperature, seed=seed, batch_size=batch_size, mirror=mirror),
        seconds=seconds,
    )


def judge(task: Task, items: Sequence[EvalItem], tokenizer: Any, jobs: Sequence[tuple[int, int, int, list[int], bool]],
          continued: Sequence[tuple[list[int], bool]]) -> list[dict[str, Any]]:
    """One record per job (k, problem, sample, prefix ids, prefix complete): ``continued`` holds the continuations
    of the incomplete prefixes, in job order. The judged text is decode(prefix + continuation)."""
    records, it = [], iter(continued)
    for k, i, j, prefix, complete in jobs:
        cont, ended = ([], True) if complete else next(it)
        text = tokenizer.decode(prefix + cont, skip_special_tokens=True)
        verdict = task.score(items[i], text)
        records.append({"id": items[i].id, "k": k, "sample": j, "prefix_tokens": len(prefix),
                        "prefix_complete": complete, "continuation_tokens": len(cont), "cut": not ended,
                        "correct": bool(verdict.correct), "answer": verdict.answer,
                        "prefix": tokenizer.decode(prefix, skip_special_tokens=True), "response": text})
    return records


def per_k_stats(records: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """Per k: samples, share of complete prefixes, share cut by max_new_tokens, mean continuation tokens."""
    out: dict[int, dict[str, float]] = {}
    for k in sorted({int(r["k"]) for r in records}):
        rs = [r for r in records if r["k"] == k]
        mean = lambda key, rs=rs: sum(float(r[key]) for r in rs) / len(rs)
        out[k] = {"samples": len(rs), "prefix_complete_share": mean("prefix_complete"), "cut_share": mean("cut"),
                  "continuation_tokens_mean": mean("continuation_tokens")}
    return out


def write_decay(result: DecayResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``decay.json`` (summary), ``decay_samples.jsonl`` (one line per sample) and ``decay.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "decay.json", "samples": out / "decay_samples.jsonl", "png": out / "decay.png"}
    summary = {"task": result.task, "mirror": result.mirror, "prefix_source": result.prefix_source,
               "continuer": result.continuer, "problems": result.problems, "n": result.n, "ks": list(result.ks),
               "accuracy": {str(k): v for k, v in result.accuracy.items()},
               "gap": {str(k): v for k, v in result.gap.items()},
               "per_k": {str(k): v for k, v in result.per_k.items()}, "warnings": result.warnings,
               "settings": result.settings,
               "seconds": result.seconds,
               "note": "accuracy = avg@n of the continuer from the prefix source's first k tokens; gap Delta(k) = "
                       "acc(0) - acc(k) (> 0: the prefix costs accuracy); a prefix source answer that ended within k "
                       "tokens is judged whole."}
    for name, text in (("json", json.dumps(summary, indent=2, default=str)),
                       ("samples", "".join(json.dumps(r, default=str) + "\n" for r in result.records))):
        (tmp := out / f".{paths[name].name}.tmp").write_text(text, encoding="utf-8")
        tmp.replace(paths[name])
    plot_decay(result, paths["png"])
    return paths


def plot_decay(result: DecayResult, path: str | Path) -> Path:
    """Two panels: the continuer's accuracy (avg@n) against the prefix length k, and Delta(k) = acc(0) - acc(k)."""
    fig, (left, right) = new_figure(2, width=10.0, height=4.0)
    ks = list(result.ks)
    who = f"{result.continuer} continues {result.prefix_source}'s k-token prefix"
    line_with_band(left, ks, [result.accuracy[k] for k in ks], label=who, color=COLORS["teacher"], marker="o")
    left.plot(ks, [result.per_k[k]["cut_share"] for k in ks], color=COLORS["cumulative"], linestyle="--",
              marker=".", label="share cut by max_new_tokens (keep near 0)")
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("prefix length k (tokens)")
    left.set_ylabel(f"accuracy (avg@{result.n})")
    left.set_title(f"decay probe{' (mirror)' if result.mirror else ''}: {result.task}, {result.problems} problems")
    left.legend(loc="best")
    line_with_band(right, ks, [result.gap[k] for k in ks], label="Delta(k) = acc(0) - acc(k)", color=COLORS["kl"],
                   marker="o")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xlabel("prefix length k (tokens)")
    right.set_ylabel("recoverability gap Delta(k)")
    right.set_title("> 0: the prefix costs the continuer accuracy")
    right.legend(loc="best")
    return save_png(fig, path)


def run_decay(
    config: str | Path | Config,
    out_dir: str | Path,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    task: str | Task = "gsm_symbolic",
    limit: int | None = 16,
    n: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 384,
    mirror: bool = False,
    seed: int = 0,
    progress: bool = True,
    prefix_temperature: float | None = None,
    batch_size: int = 8,
    task_path: str | None = None,
) -> DecayResult:
    """The decay probe (``mirror``: its mirror) on the config's student/teacher pair; writes ``out_dir``.

    ``task`` is a task name (``make_task``; ``task_path`` for file tasks) or a Task. Prefixes are sampled at
    ``prefix_temperature`` (default ``rollout.temperature``, what OPD's teacher sees in training). Raises
    ConfigError for a cross-tokenizer pair.
    """
    cfg = as_config(config)
    pair = load_pair(cfg, "the decay probe")
    the_task = make_task(task, path=task_path) if isinstance(task, str) else task
    prefix_model, continuer = (pair.teacher, pair.student) if mirror else (pair.student, pair.teacher)
    result = decay_probe(
        prefix_model, continuer, pair.tokenizer, the_task, ks=ks, limit=limit, n=n, temperature=temperature,
        max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, mirror=mirror, progress=progress,
        prefix_temperature=cfg.rollout.temperature if prefix_temperature is None else prefix_temperature,
        max_prompt_tokens=cfg.data.max_prompt_tokens,
    )
    result.settings.update(student=cfg.student.name, teacher=cfg.teacher.name)
    write_decay(result, out_dir)
    return result
