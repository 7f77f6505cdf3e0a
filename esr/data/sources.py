"""Prompt sources: GSM8K / MATH / generic JSONL files, Hugging Face datasets and the reasoning-gym generator.

Every source goes through one path: raw rows (bytes of a JSONL line, or a dict from a library) are turned into a
JSON object, a per-format parser turns the object into chat messages and a gold answer, and a collector counts the
rows it had to skip. A bad row is never a traceback: it is skipped, counted under its reason, and reported in one
warning line; only a source with no usable row at all is an error (``DataError``), because training on nothing is
never what the user meant.

    prompts = load_prompts(DataConfig(source="gsm8k", path="data/gsm8k/train.jsonl", limit=500))
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from esr.config import DataConfig
from esr.data.chat import chat_row
from esr.data.glaive import GLAIVE_EXPECTS, glaive_row
from esr.data.rows import Message, ParsedRow, Tools
from esr.data.rows import RowSkip as _Skip
from esr.errors import EsrError

log = logging.getLogger("esr.data")

Messages = tuple[Message, ...]
FILE_SOURCES = ("gsm8k", "math", "jsonl", "glaive")
SOURCES = ("gsm_symbolic", *FILE_SOURCES, "bfcl:<category>[,<category>]", "hf:<dataset>")
MAX_BAD_LINES = 10
"""How many 1-based line (or row) numbers of skipped rows a PromptSet keeps, for the warning and errors."""


class DataError(EsrError, ValueError):
    """A data source cannot give any usable prompt; the message names the file, what went wrong and what to change."""


@dataclass(frozen=True)
class Prompt:
    """One training or evaluation prompt as chat messages, with the gold answer when the source has one."""

    id: str
    """Stable within a source: ``<file name>:<line>``, ``gsm_symbolic:<seed>:<index>``, ``<dataset>/<split>:<row>``."""
    messages: Messages
    """Chat messages ({"role", "content"}, an optional system message first; assistant turns may carry
    ``tool_calls``, ``tool`` turns the results), the context the next assistant turn is sampled after; never ends
    with an assistant turn. Rendered by ``render_prompt``."""
    answer: str | None
    """Gold final answer ("72" for GSM8K's ``#### 72``, MATH's ``answer``; a chat row's trailing assistant turn),
    or None when unknown."""
    tools: Tools | None = None
    """Functions the model may call (OpenAI/HF form), rendered by the chat template's tools support; None: none."""


@dataclass(frozen=True)
class PromptSet:
    """The usable prompts of a source, in source order, with an account of the rows that were skipped."""

    prompts: tuple[Prompt, ...]
    source: str
    """Where the prompts came from: the file path, ``gsm_symbolic(size=2000, seed=0)`` or ``hf:openai/gsm8k[train]``."""
    n_rows: int
    """Rows read (blank lines are not rows). With ``data.limit`` reading stops once enough prompts are found."""
    n_skipped: int
    skipped_lines: tuple[int, ...]
    """1-based line (file) or row (library) numbers of the first ``MAX_BAD_LINES`` skipped rows."""
    skip_reasons: dict[str, int]
    """How many rows were skipped for each reason, e.g. {"invalid JSON": 2, "missing field 'question'": 1}."""


# ----------------------------------------------------------------------------------------------------------------
# Field access and per-format row parsers. A parser maps a JSON object to (messages without system, gold answer).

RowParser = Callable[[Mapping[str, object], str], ParsedRow]


def _text(row: Mapping[str, object], key: str) -> str:
    """The non-blank string field ``key``, or a _Skip naming what is wrong with it."""
    if key not in row:
        raise _Skip(f"missing field '{key}'{_near_miss(row, key)}")
    value = row[key]
    if not isinstance(value, str):
        raise _Skip(f"field '{key}' is not a string")
    if not value.strip():
        raise _Skip(f"empty field '{key}'")
    return value


def _near_miss(row: Mapping[str, object], *keys: str) -> str:
    """' (found 'quesiton')' when the row has a key that looks like a misspelling of one of ``keys``, else ''.
    A row with a typo'd field name is skipped like any other; naming the typo turns the count into the fix."""
    for key in keys:
        close = difflib.get_close_matches(key, [str(k) for k in row if k not in keys], n=1, cutoff=0.8)
        if close:
            return f" (found '{close[0]}')"
    return ""


def _gold(row: Mapping[str, object], key: str, required: bool) -> str | None:
    """A gold answer: a string, or a number written as text (some datasets store 72, not "72")."""
    value = row.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise _Skip(f"missing field '{key}'" if value is None else f"empty field '{key}'")
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _Skip(f"field '{key}' is not a string or number")
    return str(value).strip()


def _ask(question: str, instruction: str) -> list[Message]:
    content = f"{question.strip()}\n{instruction}" if instruction else question.strip()
    return [{"role": "user", "content": content}]


def _gsm8k_row(row: Mapping[str, object], instruction: str) -> ParsedRow:
    """GSM8K: ``question`` + instruction; gold is the text after the last ``####`` of ``answer``, commas removed."""
    question, solution = _text(row, "question"), _text(row, "answer")
    if "####" not in solution:
        raise _Skip("field 'answer' has no '#### N'")
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise _Skip("nothing after '####' in field 'answer'")
    return ParsedRow(_ask(question, instruction), gold)


def _math_row(row: Mapping[str, object], instruction: str) -> ParsedRow:
    """MATH / MATH-500: ``problem`` + instruction; gold is ``answer`` as written (LaTeX allowed)."""
    problem = _text(row, "problem")
    return ParsedRow(_ask(problem, instruction), _gold(row, "answer", required=True))


def _gsm_symbolic_row(row: Mapping[str, object], instruction: str) -> ParsedRow:
    """reasoning-gym ``gsm_symbolic`` item: ``question`` + instruction; gold is ``answer`` (already just the number)."""
    question = _text(row, "question")
    return ParsedRow(_ask(question, instruction), _gold(row, "answer", required=True))


_PROMPT_FIELDS = ("prompt", "question", "problem")
"""The string fields a generic row may hold its prompt in, in order of preference (``messages`` comes first)."""


def _jsonl_row(row: Mapping[str, object], instruction: str) -> ParsedRow:
    """Generic row: ``messages`` (chat list, optional ``tools``; see ``esr.data.chat``) or a string ``prompt`` /
    ``question`` / ``problem``, used as written; optional ``answer``."""
    del instruction  # generic prompts are used exactly as the user wrote them
    if "messages" in row:
        return chat_row(row, _gold(row, "answer", required=False))
    field = next((key for key in _PROMPT_FIELDS if key in row), None)
    if field is None:
        raise _Skip(f"missing field 'prompt', 'question', 'problem' or 'messages'"
                    f"{_near_miss(row, *_PROMPT_FIELDS, 'messages')}")
    return ParsedRow([{"role": "user", "content": _text(row, field)}], _gold(row, "answer", required=False))


def _glaive_row(row: Mapping[str, object], instruction: str) -> ParsedRow:
    del instruction  # glaive conversations are used as written
    return glaive_row(row)


@dataclass(frozen=True)
class _Format:
    parse: RowParser
    expects: str
    """What a good row looks like, for the error raised when no row is usable."""


_FORMATS = {
    "gsm8k": _Format(_gsm8k_row, "JSON objects with string fields 'question' and 'answer' (ending in '#### N')"),
    "math": _Format(_math_row, "JSON objects with string fields 'problem' and 'answer'"),
    "jsonl": _Format(
        _jsonl_row,
        "JSON objects with a string 'prompt' (or 'question' / 'problem') or a list 'messages' of {role, content} "
        "(optional 'tools'), optional 'answer'",
    ),
    "glaive": _Format(_glaive_row, GLAIVE_EXPECTS),
    "gsm_symbolic": _Format(_gsm_symbolic_row, "items with string fields 'question' and 'answer'"),
}


# ----------------------------------------------------------------------------------------------------------------
# Collecting rows into a PromptSet, counting what was skipped and why.


def _as_object(raw: object, first: bool) -> Mapping[str, object]:
    """Turn one raw row into a JSON object: bytes are decoded per line (UTF-8) and parsed; dicts pass through."""
    if isinstance(raw, bytes):
        if first and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark some editors write
            raw = raw[3:]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _Skip("not UTF-8") from None
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
            raise _Skip("invalid JSON") from None
    if not isinstance(raw, dict):
        raise _Skip("not a JSON object")
    return raw


@dataclass
class _Tally:
    """Running account of skipped rows while a source is read."""

    n_rows: int = 0
    n_skipped: int = 0
    bad_lines: list[int] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)

    def skip(self, row_no: int, reason: str) -> None:
        self.n_skipped += 1
        if len(self.bad_lines) < MAX_BAD_LINES:
            self.bad_lines.append(row_no)
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def summary(self) -> str:
        """'invalid JSON: 2, missing field 'question': 1', most frequent reason first."""
        ordered = sorted(self.reasons.items(), key=lambda kv: -kv[1])
        return ", ".join(f"{reason}: {count}" for reason, count in ordered)


def _collect(
    rows: Iterable[tuple[int, object]], fmt: str, cfg: DataConfig, origin: str, make_id: Callable[[int], str], unit: str
) -> PromptSet:
    """Parse numbered raw rows with format ``fmt`` into a PromptSet; raise DataError if none is usable.

    ``make_id`` turns a 1-based row number into the Prompt id; ``unit`` ("lines" or "rows") words the report.
    """
    parse, tally, prompts = _FORMATS[fmt].parse, _Tally(), []
    for row_no, raw in rows:
        tally.n_rows += 1
        try:
            messages, gold, tools = parse(_as_object(raw, first=row_no == 1), cfg.instruction)
        except _Skip as skip:
            tally.skip(row_no, str(skip))
            continue
        prompts.append(Prompt(make_id(row_no), _with_system(messages, cfg.system_prompt), gold, tools))
        if cfg.limit is not None and len(prompts) >= cfg.limit:
            break
    bad = ", ".join(map(str, tally.bad_lines))
    if not prompts:
        detail = f"{tally.n_skipped} of {tally.n_rows} rows skipped ({tally.summary()}); first bad {unit}: {bad}. "
        if tally.n_rows == 0:
            detail = "it has no rows. "
        raise DataError(f"no usable prompts in {origin}: {detail}A '{fmt}' source needs {_FORMATS[fmt].expects}.")
    if tally.n_skipped:
        log.warning(
            "skipped %d of %d rows in %s (%s); first bad %s: %s",
            tally.n_skipped, tally.n_rows, origin, tally.summary(), unit, bad,
        )
    return PromptSet(tuple(prompts), origin, tally.n_rows, tally.n_skipped, tuple(tally.bad_lines), tally.reasons)


def _with_system(messages: list[Message], system_prompt: str | None) -> Messages:
    """Put ``data.system_prompt`` first, unless the row already starts with its own system message (the row wins)."""
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return tuple(messages)


# ----------------------------------------------------------------------------------------------------------------
# Readers: each yields (1-based row number, raw row) for _collect.


def _jsonl_lines(path: Path) -> Iterator[tuple[int, object]]:
    """Non-blank lines of a JSONL file as bytes, read in binary so one bad byte spoils one line, not the file."""
    with path.open("rb") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield line_no, line


def _file_path(cfg: DataConfig) -> Path:
    if cfg.path is None:
        raise DataError(f"data.source='{cfg.source}' reads a JSONL file: set data.path")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"data file not found: {path} (data.path for data.source='{cfg.source}')")
    if not path.is_file():
        raise DataError(f"data.path {path} is not a file (data.source='{cfg.source}' reads one JSONL file)")
    return path


def _load_file(cfg: DataConfig) -> PromptSet:
    path = _file_path(cfg)
    return _collect(_jsonl_lines(path), cfg.source, cfg, str(path), lambda n: f"{path.name}:{n}", "lines")


def _load_gsm_symbolic(cfg: DataConfig) -> PromptSet:
    """Generate ``data.size`` GSM8K-style problems with reasoning-gym, deterministic for ``data.seed``.

    Items look like {"question": "... Give the result as your final answer. Do not include units.",
    "answer": "28080", "metadata": {"answer_cot": "... #### 28080", ...}}.
    """
    if cfg.size < 1:
        raise DataError(f"data.size must be at least 1 for data.source='gsm_symbolic', got {cfg.size}")
    try:
        import reasoning_gym
    except ImportError:
        raise DataError("data.source='gsm_symbolic' needs reasoning-gym: pip install reasoning-gym") from None
    dataset = reasoning_gym.create_dataset("gsm_symbolic", size=cfg.size, seed=cfg.seed)
    rows = ((i + 1, dataset[i]) for i in range(cfg.size))
    origin = f"gsm_symbolic(size={cfg.size}, seed={cfg.seed})"
    # Ids count from 0, like reasoning-gym's own metadata.source_index; rows are numbered from 1.
    return _collect(rows, "gsm_symbolic", cfg, origin, lambda n: f"gsm_symbolic:{cfg.seed}:{n - 1}", "rows")


def _hf_format(columns: Iterable[str], name: str) -> str:
    """Which row format a dataset's columns match (gsm8k, math, glaive or jsonl)."""
    cols = set(columns)
    if {"system", "chat"} <= cols:
        return "glaive"
    if {"question", "answer"} <= cols:
        return "gsm8k"
    if {"problem", "answer"} <= cols:
        return "math"
    if "prompt" in cols or "messages" in cols:
        return "jsonl"
    raise DataError(
        f"cannot tell the format of dataset '{name}' from its columns {sorted(cols)}: expected 'question'+'answer' "
        f"(GSM8K), 'problem'+'answer' (MATH), 'system'+'chat' (glaive), or 'prompt' / 'messages' (generic)"
    )


def _load_hf(cfg: DataConfig) -> PromptSet:
    """Read ``hf:<name>`` or ``hf:<name>:<config>`` (e.g. ``hf:openai/gsm8k:main``) split ``data.split``."""
    spec = cfg.source.removeprefix("hf:")
    name, _, subset = spec.partition(":")
    if not name:
        raise DataError("data.source='hf:' needs a dataset name, e.g. hf:openai/gsm8k:main")
    try:
        import datasets
    except ImportError:
        raise DataError(f"data.source='{cfg.source}' needs the datasets library: pip install datasets") from None
    try:
        dataset = datasets.load_dataset(name, subset or None, split=cfg.split)
    except Exception as e:  # the library raises many types (network, missing config, bad split); report them all
        raise DataError(f"could not load dataset '{spec}' split '{cfg.split}': {e}") from e
    fmt = _hf_format(dataset.column_names, spec)
    rows = ((i, row) for i, row in enumerate(dataset, start=1))
    return _collect(rows, fmt, cfg, f"hf:{spec}[{cfg.split}]", lambda n: f"{spec}/{cfg.split}:{n}", "rows")


def _load_bfcl(cfg: DataConfig) -> PromptSet:
    """The questions (never the answers) of BFCL categories ``bfcl:live_simple,live_multiple``, category by category
    in file order, rendered exactly as ``bfcl:*`` evaluation renders them: BFCL's prompting-mode system prompt with
    the function docs as JSON, then the question (so training moves what the evaluation measures)."""
    from esr.data.bfcl import CATEGORIES, load_bfcl, render_tools_prompt

    categories = [c.strip() for c in cfg.source.removeprefix("bfcl:").split(",") if c.strip()]
    unknown = [c for c in categories if c not in CATEGORIES]
    if not categories or unknown:
        raise DataError(f"data.source='{cfg.source}': unknown BFCL category {unknown or ['']}; "
                        f"available: {', '.join(CATEGORIES)}")
    try:
        items = [item for category in categories for item in load_bfcl(category)]
    except (ModuleNotFoundError, FileNotFoundError, ValueError) as e:
        raise DataError(f"data.source='{cfg.source}': {e}") from e
    rows = ((n, {"id": item.id, "messages": render_tools_prompt(item)}) for n, item in enumerate(items, start=1))
    origin = f"bfcl:{','.join(categories)}"
    return _collect(rows, "jsonl", cfg, origin, lambda n: f"bfcl:{items[n - 1].id}", "rows")


def load_prompts(cfg: DataConfig) -> PromptSet:
    """Read the prompts ``cfg`` names, in source order (the trainer shuffles with its own seed).

    Math sources (gsm8k, math, gsm_symbolic) get ``data.instruction`` after the question; ``jsonl``, ``glaive`` and
    ``bfcl:`` rows are used as written (a chat row's trailing assistant turn becomes the answer, see
    ``esr.data.chat``). ``data.system_prompt`` becomes a leading system message. Malformed rows are skipped and
    counted (one warning on logger ``esr.data``); no usable row, a missing file or an unknown source raise
    ``DataError``.
    """
    if cfg.limit is not None and cfg.limit < 1:
        raise DataError(f"data.limit must be at least 1 (or null for no limit), got {cfg.limit}")
    if cfg.source.startswith("hf:"):
        return _load_hf(cfg)
    if cfg.source.startswith("bfcl:"):
        return _load_bfcl(cfg)
    if cfg.source in FILE_SOURCES:
        return _load_file(cfg)
    if cfg.source == "gsm_symbolic":
        return _load_gsm_symbolic(cfg)
    names = ["gsm_symbolic", *FILE_SOURCES, "hf:", "bfcl:"]
    close = difflib.get_close_matches(cfg.source, names, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise DataError(f"unknown data.source '{cfg.source}'.{hint} Valid sources: {', '.join(SOURCES)}")
