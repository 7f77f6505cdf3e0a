"""Re-judge the claims study's greedy evaluations under a longer token cap, regenerating only the answers it cut.

A greedy answer that ended before the old cap ends the same way under a longer one, so only the answers the cap cut
(``cut`` in samples.jsonl; they count as wrong) are generated again, from scratch, with ``--cap`` new tokens; the
rest are kept as they are. For one evaluation with a share c of answers cut this costs about c of a full
re-evaluation at the new cap. (Regenerated answers are batched with other prompts than before; padding can move a
greedy choice where two tokens tie to float rounding, so they are what a full run at the new cap gives up to that.)

    python studies/longer_cap.py studies/runs/quickstart --cap 768             # base student + each arm's last eval
    python studies/longer_cap.py studies/runs/quickstart --cap 768 --arms esr-100 full-512 --teacher

Each result lands beside the evaluation it extends, as ``<eval dir>/cap-<cap>/{samples.jsonl,summary.json}``
(``summary.json`` also says how many answers were regenerated and the old cap); finished ones are skipped, so the
script resumes. ``studies/claims_summary.py`` puts them in a table of their own.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from esr.config import load_config  # noqa: E402
from esr.eval.runner import evaluate, summarize, write_results  # noqa: E402
from esr.eval.tasks import EvalItem, Task, Verdict, make_task  # noqa: E402
from esr.models import load_model  # noqa: E402
from esr.report.collect import read_jsonl  # noqa: E402

log = logging.getLogger("studies.longer_cap")


@dataclass(frozen=True)
class Subset:
    """The problems of ``task`` whose ids are in ``ids`` (the cut ones), judged as ``task`` judges them."""

    task: Task
    ids: frozenset[str]

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def kind(self) -> str:
        return self.task.kind

    def load(self, limit: int | None) -> list[EvalItem]:
        return [it for it in self.task.load(None) if it.id in self.ids]

    def score(self, item: EvalItem, response: str) -> Verdict:
        return self.task.score(item, response)


def extend(eval_dir: Path, model_spec: str, task: Task, cap: int, *, batch_size: int = 16,
           progress: bool = True) -> dict[str, Any]:
    """``eval_dir``'s evaluation under a ``cap``-token cap (see the module docstring); returns its summary."""
    out = eval_dir / f"cap-{cap}"
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    old_summary = json.loads((eval_dir / "summary.json").read_text())
    if old_summary["temperature"] != 0 or old_summary["n"] != 1:
        raise ValueError(f"{eval_dir} is not a greedy n=1 evaluation: its uncut answers would not carry over")
    if old_summary["max_new_tokens"] >= cap:
        raise ValueError(f"{eval_dir} already ran with a cap of {old_summary['max_new_tokens']} >= {cap}")
    old, torn = read_jsonl(eval_dir / "samples.jsonl")
    if torn:
        raise ValueError(f"{eval_dir / 'samples.jsonl'} has {torn} unreadable lines: evaluate it again instead")
    cut = frozenset(r["id"] for r in old if r["cut"])
    fresh: dict[str, dict[str, Any]] = {}
    seconds = 0.0
    if cut:
        log.info("%s: %d of %d answers were cut at %d tokens; regenerating them with %d (%s)", eval_dir, len(cut),
                 len(old), old_summary["max_new_tokens"], cap, model_spec)
        model, tokenizer = load_model(model_spec)
        result = evaluate(model, tokenizer, Subset(task, cut), n=1, temperature=0.0, max_new_tokens=cap,
                          batch_size=batch_size, progress=progress)
        fresh, seconds = {r["id"]: r for r in result.samples}, result.summary["seconds"]
        del model
        gc.collect()
        missing = cut - fresh.keys()
        if missing:
            raise ValueError(f"{len(missing)} cut problems of {eval_dir} were not found in the task again, e.g. "
                             f"{sorted(missing)[0]}: is --test-data the file the study evaluated on?")
    records = [fresh[r["id"]] if r["cut"] else r for r in old]
    summary = summarize(task, records, 1)
    summary.update(n_problems=len(records), n_samples=len(records), temperature=0.0, max_new_tokens=cap,
                   previous_max_new_tokens=old_summary["max_new_tokens"], regenerated=len(cut),
                   previous_accuracy=old_summary["accuracy"], seconds=seconds)
    write_results(out, records, summary)
    return summary


def targets(study: Path, arms: list[str], teacher: bool) -> list[tuple[str, Path, str]]:
    """(label, evaluation folder, model spec): the base student, each trained arm's last evaluation and checkpoint,
    and with ``teacher`` the teacher's evaluation."""
    first = next((study / a for a in arms if (study / a / "config.yaml").is_file()), None)
    if first is None:
        raise SystemExit(f"no trained arm in {study} (looked for {arms})")
    cfg = load_config(first / "config.yaml")
    out = [("base student", study / "base-eval", cfg.student.name)]
    if teacher:
        out.append(("teacher", study / "teacher-eval", cfg.teacher.name))
    for arm in arms:
        evals = sorted((study / arm / "eval").glob("step-*/summary.json"))
        if not evals:
            log.info("%s: no evaluation yet, skipped", arm)
            continue
        step = evals[-1].parent.name
        ckpt = study / arm / "checkpoints" / step
        if not ckpt.is_dir():
            raise SystemExit(f"{arm}: evaluation {step} has no checkpoint {ckpt} to regenerate from")
        out.append((f"{arm}/{step}", evals[-1].parent, str(ckpt)))
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", type=Path, help="a claims study folder (studies/runs/<pair>)")
    ap.add_argument("--cap", type=int, default=768, help="the new max_new_tokens")
    ap.add_argument("--arms", nargs="*", help="default: every arm in the study's study.json")
    ap.add_argument("--teacher", action="store_true", help="also the teacher's evaluation (slow: the larger model)")
    ap.add_argument("--test-data", help="the evaluation's JSONL (default: the one study.json names)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    study_json = json.loads((args.study / "study.json").read_text())
    arms = args.arms or study_json["arms"]
    task = make_task("gsm8k", path=args.test_data or study_json["args"]["test_data"])
    return {label: extend(eval_dir, spec, task, args.cap, batch_size=args.batch, progress=args.progress)
            for label, eval_dir, spec in targets(args.study, arms, args.teacher)}


if __name__ == "__main__":
    main()
