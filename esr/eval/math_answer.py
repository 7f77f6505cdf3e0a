"""Final answers of math responses: extraction, normalization, equivalence, and the collapse diagnostics.

Extraction (``extract_answer``), by rule:

- ``boxed_last`` / ``boxed_first``: the content of the last / first ``\\boxed{...}`` (or ``\\fbox{...}``, or
  ``\\boxed X`` with a single token X), braces matched with nesting (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``);
- ``hash``: GSM8K style, the rest of the line after the last ``####``;
- ``answer_is``: the last "the answer is X" / "the final answer is X" / "Answer: X", up to the end of its line or
  sentence, without ``$``, markdown ``**`` and a trailing period (a box inside X is unwrapped);
- ``auto``: ``boxed_last``, else ``hash``, else ``answer_is``, else the last number in the text (a ``-`` counts only
  when it is not a binary minus: in ``3-5`` the last number is ``5``).

Equivalence (``is_equivalent(pred, gold)``): None is never correct; then, after ``normalize_number``, equal strings
are equivalent; two plain decimals are compared as floats, |p - g| <= 1e-6 * max(|p|, |g|); anything else goes to
math-verify, ``verify(parse("\\boxed{gold}"), parse("\\boxed{pred}"))``, so ``\\frac{1}{2}``, ``\\dfrac12``, ``1/2`` and
``0.5`` all agree. It never raises; it never hangs in the main thread, where math-verify's own timeouts apply
(``signal.alarm``: in other threads math-verify would raise, so they are turned off there and a pathological answer
can take as long as sympy takes). Answers longer than ``MAX_VERIFY_CHARS`` are never handed to sympy.

Diagnostics of repetition collapse: ``relaxed_correct`` (the gold answer appears anywhere in the response, even if
the final answer is wrong or missing), ``count_boxed`` and ``repeated_ngram_share`` =
#{i : ngram_i in {ngram_j : j < i}} / #ngrams, with ngram_i = tokens[i : i + n].
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Sequence
from typing import Literal

log = logging.getLogger("esr.eval")

MAX_VERIFY_CHARS = 1000
"""Answers longer than this are compared as strings only: a real final answer is never this long, sympy may be."""

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_THOUSANDS_IN_TEXT = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?![\d,])")
_DECIMAL = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_NUMBER_IN_TEXT = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_ANSWER_IS = re.compile(r"(?i)\banswer(?:\s+is\b|\**\s*:)\s*:?[ \t]*([^\n]*)")
_HASH = "####"


def _box_content(text: str, start: int) -> tuple[str, int] | None:
    """Content and end index of the box whose command ends at ``start`` (just after ``\\boxed``), or None."""
    i = start
    while i < len(text) and text[i] in " \t":
        i += 1
    if i < len(text) and text[i] == "{":
        depth, j = 0, i
        while j < len(text):
            ch = text[j]
            if ch == "\\":
                j += 2  # an escaped character (\{, \}, \\) never opens or closes a group
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j], j + 1
            j += 1
        return None
    if i > start:  # "\boxed 5": one token, up to whitespace or a math delimiter
        m = re.match(r"[^\s$]+", text[i:])
        if m:
            return m.group(0), i + m.end()
    return None


def _all_boxed(text: str) -> list[str]:
    """Contents of the top-level well-formed boxes, in order (a box inside a box is not counted twice)."""
    found: list[str] = []
    pos = 0
    while (m := _BOX.search(text, pos)) is not None:
        got = _box_content(text, m.end())
        if got is None:
            pos = m.end()
            continue
        content, pos = got[0].strip(), got[1]
        while (inner := _BOX.match(content)) and (box := _box_content(content, inner.end())) and box[1] == len(content):
            content = box[0].strip()  # \boxed{\boxed{5}} -> 5
        found.append(content)
    return found


def extract_boxed(text: str, which: Literal["last", "first"] = "last") -> str | None:
    """Content of the last (or first) ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed X`` in ``text``, or None."""
    boxes = _all_boxed(text) if isinstance(text, str) else []
    if not boxes:
        return None
    return boxes[-1] if which == "last" else boxes[0]


def count_boxed(text: str) -> int:
    """Number of top-level well-formed boxes in ``text`` (unbalanced ``\\boxed{`` are not counted)."""
    return len(_all_boxed(text)) if isinstance(text, str) else 0


def _clean(answer: str) -> str | None:
    """Strip whitespace, markdown bold, ``$`` delimiters and a trailing period; unwrap a box; None when empty."""
    s = answer.strip()
    if (boxed := extract_boxed(s, "last")) is not None:
        s = boxed
    s = s.replace("**", "").strip()
    s = s.strip("$").strip()
    s = re.sub(r"\.$", "", s).strip().strip("$").strip()
    return s or None


def _answer_is(text: str) -> str | None:
    """X of the last "answer is X" / "Answer: X", cut at the end of its line or of its sentence (". ")."""
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    tail = matches[-1].group(1)
    tail = re.split(r"\.\s", tail, maxsplit=1)[0]
    return _clean(tail)


def _hash(text: str) -> str | None:
    """The rest of the line after the last ``####`` (GSM8K)."""
    if _HASH not in text:
        return None
    rest = text.rsplit(_HASH, 1)[1].strip()
    return _clean(rest.split("\n", 1)[0]) if rest else None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER_IN_TEXT.findall(text)
    return numbers[-1] if numbers else None


def extract_answer(
    text: str, rule: Literal["boxed_last", "boxed_first", "hash", "answer_is", "auto"] = "auto"
) -> str | None:
    """The final answer of ``text`` under ``rule`` (module docstring), or None when the rule finds nothing."""
    if not isinstance(text, str):
        return None
    if rule == "boxed_last":
        return extract_boxed(text, "last")
    if rule == "boxed_first":
        return extract_boxed(text, "first")
    if rule == "hash":
        return _hash(text)
    if rule == "answer_is":
        return _answer_is(text)
    if rule == "auto":
        for found in (extract_boxed(text, "last"), _hash(text), _answer_is(text)):
            if found is not None:
                return found
        return _last_number(text)
    raise ValueError(f"unknown extraction rule {rule!r}: boxed_last, boxed_first, hash, answer_is or auto")


def normalize_number(s: str) -> str:
    """Conservative surface normalization: strips whitespace, ``$`` / ``\\$``, a trailing period, ``%`` / ``\\%``,
    LaTeX spacing (``\\!``, ``\\,``, ``{,}`` -> ``,``), and removes thousands separators only when the whole string is
    a number grouped by threes (``1,234`` and ``-12,345.5`` lose their commas; ``1,2`` and ``1,23`` are kept, they are
    lists). Words and units are left alone (math-verify handles ``\\text{cm}``, ``^\\circ``)."""
    s = str(s).strip()
    s = s.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\$", "").replace("$", "")
    s = s.strip()
    s = re.sub(r"\\?%$", "", s).strip()
    if s.endswith(".") and not s.endswith(".."):
        s = s[:-1].strip()
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def _parse(s: str, timeout: int | None) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    parsed = parse(f"\\boxed{{{s}}}", extraction_config=config, parsing_timeout=timeout)
    if not parsed:  # unbalanced braces break the box: try the bare string
        parsed = parse(s, extraction_config=config, parsing_timeout=timeout)
    return parsed


def _math_verify(pred: str, gold: str, timeout_seconds: float) -> bool:
    from math_verify import verify
    from math_verify.errors import TimeoutException

    in_main = threading.current_thread() is threading.main_thread()  # signal.alarm works only there
    timeout = max(1, math.ceil(timeout_seconds)) if in_main and timeout_seconds > 0 else None  # alarm takes an int
    try:
        gold_parsed, pred_parsed = _parse(gold, timeout), _parse(pred, timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except (Exception, TimeoutException):
        log.debug("math-verify failed on pred=%.80r gold=%.80r", pred, gold, exc_info=True)
        return False


def is_equivalent(pred: str | None, gold: str, timeout_seconds: float = 5) -> bool:
    """Whether the predicted answer equals the gold one (module docstring). Never raises: any failure is False."""
    try:
        if pred is None or gold is None:
            return False
        p, g = normalize_number(pred), normalize_number(gold)
        if not p or not g:
            return False
        if p == g:
            return True
        if _DECIMAL.match(p) and _DECIMAL.match(g):
            a, b = float(p), float(g)
            return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 1e-6 * max(abs(a), abs(b))
        if len(p) > MAX_VERIFY_CHARS or len(g) > MAX_VERIFY_CHARS:
            return False
        return _math_verify(p, g, timeout_seconds)
    except Exception:
        log.debug("is_equivalent failed", exc_info=True)
        return False


def relaxed_correct(text: str, gold: str) -> bool:
    """Whether the gold answer appears anywhere in ``text``: a numeric gold as a whole number (gold 12 matches "12"
    and "12.0", not "123", "1.12" or "12.5"; gold 1234 matches "1,234"), any other gold as a substring (whitespace
    ignored) not glued to letters or digits. Thousands separators are removed on both sides first. Never raises."""
    try:
        if not isinstance(text, str) or gold is None:
            return False
        g = normalize_number(gold)
        if not g:
            return False
        text = _THOUSANDS_IN_TEXT.sub(lambda m: m.group(0).replace(",", ""), text.replace("{,}", ","))
        if _DECIMAL.match(g):
            target = float(g)
            for num in _NUMBER_IN_TEXT.findall(text):
                value = float(num.replace(",", ""))
                if abs(value - target) <= 1e-6 * max(abs(value), abs(target)):
                    return True
            return False
        g, flat = re.sub(r"\s+", "", g), re.sub(r"\s+", "", text)
        before = r"(?<![A-Za-z0-9])" if g[0].isalnum() else ""
        after = r"(?![A-Za-z0-9])" if g[-1].isalnum() else ""
        return re.search(before + re.escape(g) + after, flat) is not None
    except Exception:
        log.debug("relaxed_correct failed", exc_info=True)
        return False


def repeated_ngram_share(token_ids: Sequence[int] | str, n: int = 4) -> float:
    """Share of the sequence's n-grams that repeat an earlier n-gram (0.0 when there are none). A string is split
    on whitespace; ``[1, 2, 3] * 100`` gives 294 / 297 at n = 4, distinct tokens give 0."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    tokens = token_ids.split() if isinstance(token_ids, str) else list(token_ids)
    total = len(tokens) - n + 1
    if total <= 0:
        return 0.0
    seen: set[tuple] = set()
    repeats = 0
    for i in range(total):
        gram = tuple(tokens[i : i + n])
        if gram in seen:
            repeats += 1
        else:
            seen.add(gram)
    return repeats / total
