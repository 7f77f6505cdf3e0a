"""BFCL (Berkeley Function Calling Leaderboard) single-turn AST categories, read from the ``bfcl-eval`` package's data.

    items = load_bfcl("parallel", limit=50)
    messages = render_tools_prompt(items[0])  # BFCL's prompting-mode system prompt, then the user turn

Only the data is used (``pip install --no-deps bfcl-eval``): each category is a JSONL file
``data/BFCL_v<N>_<category>.json`` of ``{"id", "question": [[{role, content}, ...]], "function": [...]}`` rows, and
``data/possible_answer/`` holds the matching ``{"id", "ground_truth": [{func: {param: [allowed values]}}]}`` rows.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from dataclasses import dataclass
from typing import Any

INSTALL_HINT = "pip install --no-deps bfcl-eval==2026.3.23"
CATEGORIES: dict[str, str] = {
    "simple": "simple_python",
    "simple_python": "simple_python",
    "multiple": "multiple",
    "parallel": "parallel",
    "parallel_multiple": "parallel_multiple",
    "live_simple": "live_simple",
    "live_multiple": "live_multiple",
    "live_parallel": "live_parallel",
    "live_parallel_multiple": "live_parallel_multiple",
}
"""Our category names -> BFCL's file stems. Only Python AST categories with a ground truth are offered."""

# BFCL's default prompting-mode system prompt ("ret_fmt=python&tool_call_tag=False&func_doc_fmt=json&
# prompt_fmt=plaintext&style=classic", bfcl_eval/constants/default_prompts.py), kept word for word for comparability.
SYSTEM_PROMPT = (
    "You are an expert in composing functions.You are given a question and a set of possible functions. Based on the "
    "question, you will need to make one or more function/tool calls to achieve the purpose. If none of the functions "
    "can be used, point it out. If the given question lacks the parameters required by the function, also point it "
    "out.\n\nYou should only return the function calls in your response.\n\nIf you decide to invoke any of the "
    "function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, "
    "params_name2=params_value2...), func_name2(params)].  You SHOULD NOT include any other text in the response.\n\n"
    "At each turn, you should try your best to complete the tasks requested by the user within the current turn. "
    "Continue to output functions to call until you have fulfilled the user's request to the best of your ability. "
    "Once you have no more functions to call, the system will consider the current turn complete and proceed to the "
    "next turn or task.\n\nHere is a list of functions in json format that you can invoke.\n{functions}\n"
)
PYTHON_HINT = " Note that the provided function is in Python 3 syntax."
"""BFCL appends this to every function description of the Python categories before prompting."""


@dataclass(frozen=True)
class BfclItem:
    """One BFCL test case: the chat turns, the function docs offered, and the allowed answers."""

    id: str
    messages: list[dict[str, str]]
    """The question's turns flattened into chat messages ({"role", "content"}); some live rows start with a system
    message."""
    functions: list[dict[str, Any]]
    """Function docs: ``{"name", "description", "parameters": {"type": "dict", "properties", "required"}}``."""
    ground_truth: list[dict[str, dict[str, list]]]
    """``[{func: {param: [allowed values]}}]``, one entry per expected call; ``""`` allowed = may be left out."""


def load_bfcl(category: str, limit: int | None = None) -> list[BfclItem]:
    """The first ``limit`` (all when None) test cases of a BFCL category, in file order."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; available: {', '.join(CATEGORIES)}")
    data = _data_dir()
    stem = CATEGORIES[category]
    questions = _read_jsonl(_find_file(data, stem))
    answers = {row["id"]: row["ground_truth"] for row in _read_jsonl(_find_file(data / "possible_answer", stem))}
    items = []
    for row in questions[:limit] if limit is not None else questions:
        if row["id"] not in answers:
            raise ValueError(f"BFCL {stem}: no possible answer for {row['id']!r}")
        messages = [{"role": m["role"], "content": m["content"]} for turn in row["question"] for m in turn]
        items.append(BfclItem(row["id"], messages, row["function"], answers[row["id"]]))
    return items


def render_tools_prompt(item: BfclItem) -> list[dict[str, str]]:
    """Chat messages as BFCL's prompting mode sends them: its system prompt with the function docs as JSON (a system
    message of the item is appended to it), then the item's turns. The item itself is not changed."""
    functions = copy.deepcopy(item.functions)
    for function in functions:
        function["description"] = function.get("description", "") + PYTHON_HINT
    system = SYSTEM_PROMPT.replace("{functions}", json.dumps(functions, indent=4))
    messages = [dict(message) for message in item.messages]
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = system + "\n\n" + messages[0]["content"]
        return messages
    return [{"role": "system", "content": system}, *messages]


def _data_dir() -> Any:
    try:
        return importlib.resources.files("bfcl_eval") / "data"
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"the BFCL data comes from the bfcl-eval package: {INSTALL_HINT}") from None


def _find_file(folder: Any, stem: str) -> Any:
    """``BFCL_v<N>_<stem>.json`` in ``folder``, the highest version N when several are present."""
    pattern = re.compile(rf"BFCL_v(\d+)_{re.escape(stem)}\.json")
    found = [(int(m.group(1)), entry) for entry in folder.iterdir() if (m := pattern.fullmatch(entry.name))]
    if not found:
        raise FileNotFoundError(f"no BFCL_v*_{stem}.json in {folder}; reinstall: {INSTALL_HINT}")
    return max(found, key=lambda pair: pair[0])[1]


def _read_jsonl(path: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
