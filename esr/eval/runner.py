"""Run a task on a model: sample n responses per problem, judge each, summarise.

    result = evaluate(model, tokenizer, make_task("gsm_symbolic"), n=4, temperature=0.7, limit=200)
    result.summary["accuracy"], result.summary["pass@4"], result.summary["maj@4"]

Metrics over problems i with n samples each, c_i of them correct:
    accuracy = avg@n = mean_i c_i / n          (pass@1 is the same estimate)
    pass@k   = mean_i 1 - C(n - c_i, k) / C(n, k)          (unbiased, Chen et al. 2021)
    maj@n    = share of problems whose most common answer (answers grouped by equivalence) is correct  (math)
plus response lengths (tokens: p10/p50/p90/mean/max), the share cut by ``max_new_tokens``, and the collapse signals:
share of responses with several ``\\boxed{}``, mean repeated-4-gram share, relaxed accuracy (gold anywhere in the
text) and first-box accuracy (math); name accuracy and parse rate (tools).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esr.data.sources import DataError, Prompt
from esr.data.template import render_prompt, tokenize_prompts
from esr.eval.tasks import EvalItem, Task
from esr.progress import progress_bar
from esr.rollout.eos import eos_token_ids
from esr.rollout.sampler import HFSampler


@dataclass(frozen=True)
class EvalResult:
    task: str
    summary: dict[str, Any]
    samples: list[dict[str, Any]]


def evaluate(
    model: Any,
    tokenizer: Any,
    task: Task,
    *,
    n: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 512,
    limit: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    max_prompt_tokens: int = 4096,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> EvalResult:
    """Sample ``n`` responses per problem (greedy when ``temperature`` is 0), judge them, write and return results.

    ``out_dir`` (optional) receives ``samples.jsonl`` (one line per response: prompt, response, extracted answer,
    verdict) and ``summary.json``.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be at least 1, got n={n}, batch_size={batch_size}")
    if temperature == 0 and n > 1:
        raise ValueError(f"n={n} greedy samples would all be the same: use --temperature > 0 or --n 1")
    items = task.load(limit)
    if not items:
        raise DataError(f"task {task.name} has no problems to evaluate")
    tokenized = tokenize_prompts([Prompt(it.id, it.messages, None) for it in items], tokenizer, max_prompt_tokens)
    by_id = {it.id: it for it in items}
    kept = [by_id[p.id] for p in tokenized.prompts]
    eos = eos_token_ids(tokenizer, model)
    sampler = HFSampler(model, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, temperature=temperature)
    jobs = [(i, s) for i in range(len(kept)) for s in range(n)]
    records: list[dict[str, Any]] = []
    t0, n_tokens, seconds_judge = time.perf_counter(), 0, 0.0
    with progress_bar(progress) as bar:
        task_id = bar.add_task(f"eval {task.name}", total=len(jobs))
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            rollouts = sampler.sample([tokenized.ids[i] for i, _ in chunk], max_new_tokens,
                                      seed=seed * 1_000_003 + start)
            t_judge = time.perf_counter()
            for row, (i, s) in enumerate(chunk):
                ids = rollouts.response_ids_B_R[row, : int(rollouts.lengths_B[row])].tolist()
                n_tokens += len(ids)
                records.append(_judge(task, kept[i], s, ids, bool(rollouts.cut_B[row]), tokenizer))
            seconds_judge += time.perf_counter() - t_judge
            bar.update(task_id, advance=len(chunk))
    seconds = time.perf_counter() - t0
    summary = summarize(task, records, n)
    summary.update(n_problems=len(kept), n_samples=len(records), prompts_dropped=tokenized.n_too_long,
                   temperature=temperature, max_new_tokens=max_new_tokens, seconds=seconds,
                   seconds_judge=seconds_judge,
                   tokens_per_second=n_tokens / seconds if seconds else 0.0)
    for rec, (i, _) in zip(records, jobs, strict=True):
        rec["prompt"] = render_prompt(tokenizer, kept[i].messages)
    if out_dir is not None:
        write_results(Path(out_dir), records, summary)
    return EvalResult(task.name, summary, records)


def _judge(task: Task, item: EvalItem, sample: int, ids: list[int], cut: bool, tokenizer: Any) -> dict[str, Any]:
    from esr.eval.math_answer import repeated_ngram_share

    text = tokenizer.decode(ids, skip_special_tokens=True)
    verdict = task.score(item, text)
    return {"id": item.id, "sample": sample, "response": text, "answer": verdict.answer, "correct": verdict.correct,
            "tokens": len(ids), "cut": cut, "repeated_4gram_share": repeated_ngram_share(ids, 4), **verdict.details}


def summarize(task: Task, records: Sequence[dict[str, Any]], n: int) -> dict[str, Any]:
    """The metrics of the module docstring from per-response records (ordered by problem, then sample)."""
    from esr.eval.math_answer import is_equivalent
    from esr.eval.metrics import length_stats, maj_at_k, pass_at_k

    per_problem: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        per_problem.setdefault(r["id"], []).append(r)
    mean = lambda values: sum(values) / len(values) if values else 0.0
    out: dict[str, Any] = {"task": task.name, "n": n, "accuracy": mean([float(r["correct"]) for r in records])}
    for k in sorted({1, n}):
        out[f"pass@{k}"] = mean([pass_at_k(len(rs), sum(r["correct"] for r in rs), k) for rs in per_problem.values()])
    lengths = length_stats([r["tokens"] for r in records])
    out.update({f"length_{k}": v for k, v in lengths.items()})
    out["cut_share"] = mean([float(r["cut"]) for r in records])
    out["repeated_4gram_share"] = mean([r["repeated_4gram_share"] for r in records])
    if task.kind == "math":
        if n > 1:
            out[f"maj@{n}"] = mean([float(maj_at_k([r["answer"] for r in rs], rs[0]["gold"], is_equivalent))
                                    for rs in per_problem.values()])
        out["first_box_accuracy"] = mean([float(r["first_box_correct"]) for r in records])
        out["relaxed_accuracy"] = mean([float(r["relaxed_correct"]) for r in records])
        out["multi_box_share"] = mean([float(r["boxes"] > 1) for r in records])
    if task.kind == "tools":
        out["name_accuracy"] = mean([float(r["name_correct"]) for r in records])
        out["parse_rate"] = mean([float(r["parsed"]) for r in records])
    return out


def write_results(out_dir: Path, records: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """``samples.jsonl`` and ``summary.json``, each written to a temporary name and renamed (never half-written)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("samples.jsonl", "".join(json.dumps(r, default=str) + "\n" for r in records)),
                       ("summary.json", json.dumps(summary, indent=2, default=str))):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out_dir / name)
