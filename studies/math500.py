"""The claims study's models on MATH-500's easy levels: the base student, the teacher and each arm's last checkpoint.

GSM8K is the study's evaluation; this is the second one the issue asks for, "if the models can solve any". It takes
the MATH-500 problems of ``--levels`` (default 1 and 2: 133 of the 500) in file order, evaluates the first
``--limit`` greedily with the same prompt format as GSM8K (reason step by step, answer in ``\\boxed{}``; judged by
``esr.eval.math_answer``, math-verify where it parses), and writes one table.

    python studies/math500.py studies/runs/quickstart --arms esr-100 full-512 --teacher
    python studies/math500.py studies/runs/quickstart --arms esr-100 full-512 --teacher --into RESULTS.md

Everything lands in ``<study>/math500-l<levels>/``: ``problems.jsonl`` (the chosen rows), one evaluation folder per
model (``samples.jsonl``, ``summary.json``; finished ones are skipped, so the script resumes) and ``table.md``.
``--into PAGE`` puts the table between ``<!-- claims_summary <name>-math500 -->`` markers (claims_summary.splice).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from claims_summary import splice  # noqa: E402
from longer_cap import targets  # noqa: E402

from esr.eval.runner import evaluate  # noqa: E402
from esr.eval.tasks import make_task  # noqa: E402
from esr.models import load_model  # noqa: E402

log = logging.getLogger("studies.math500")
MATH500 = Path(__file__).resolve().parents[2] / "shared/data/math500/test.jsonl"


def level_subset(source: Path, levels: list[int], out: Path) -> int:
    """Write the rows of ``source`` whose ``level`` is in ``levels`` to ``out`` (file order kept); returns how many."""
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    chosen = [r for r in rows if r.get("level") in levels]
    if not chosen:
        raise SystemExit(f"{source}: no row has a level in {levels} (levels there: "
                         f"{sorted({r.get('level') for r in rows}, key=str)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in chosen))
    return len(chosen)


def folder_name(label: str) -> str:
    """``esr-100/step-000016`` -> ``esr-100_step-000016``; ``base student`` -> ``base-student``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", label.replace("/", "_"))


def table(results: dict[str, dict[str, Any]], levels: list[int], total: int, max_new_tokens: int) -> str:
    n = next(iter(results.values()))["n_problems"] if results else 0
    lines = [f"# MATH-500 levels {', '.join(map(str, levels))}", "",
             f"The first {n} of the {total} problems of MATH-500 levels {', '.join(map(str, levels))} (file order), "
             f"greedy, {max_new_tokens} new tokens at most.", "",
             "| model | accuracy | solved | relaxed | cut at cap | length p50 | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for label, s in results.items():
        lines.append(f"| {label} | {s['accuracy']:.3f} | {round(s['accuracy'] * s['n_problems'])}/{s['n_problems']} "
                     f"| {s['relaxed_accuracy']:.3f} | {s['cut_share']:.2f} | {s['length_p50']:.0f} | "
                     f"{s['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path, help="a claims study folder (studies/runs/<name>)")
    ap.add_argument("--arms", nargs="*", help="default: every arm in the study's study.json")
    ap.add_argument("--teacher", action="store_true", help="also the teacher (slow: the larger model)")
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--data", type=Path, default=MATH500, help="MATH-500's test.jsonl")
    ap.add_argument("--into", type=Path, help="a page whose '<name>-math500' claims_summary markers get the table")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    study_json = json.loads((args.study / "study.json").read_text())
    out = args.study / f"math500-l{''.join(map(str, sorted(args.levels)))}"
    total = level_subset(args.data, args.levels, out / "problems.jsonl")
    task = make_task("math500", path=str(out / "problems.jsonl"))
    results = {}
    for label, _, spec in targets(args.study, args.arms or study_json["arms"], args.teacher):
        eval_dir = out / folder_name(label)
        if not (eval_dir / "summary.json").is_file():
            log.info("%s: evaluating %s on %d MATH-500 problems", label, spec, min(args.limit, total))
            model, tokenizer = load_model(spec)
            evaluate(model, tokenizer, task, n=1, temperature=0.0, limit=args.limit,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch, seed=0, out_dir=eval_dir,
                     progress=args.progress)
            del model
            gc.collect()
        results[label] = json.loads((eval_dir / "summary.json").read_text())
    md = table(results, args.levels, total, args.max_new_tokens)
    (out / "table.md").write_text(md)
    print(md)
    if args.into:
        splice(args.into, f"{(study_json.get('args') or {}).get('name') or args.study.name}-math500", md)
    return results


if __name__ == "__main__":
    main()
