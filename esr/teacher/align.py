"""Cross-tokenizer alignment: which student tokens and which teacher tokens cover the same stretch of text.

Both tokenizations are of one response text. Each token covers a byte span (``token_bytes``); a **group** is a run
of consecutive student tokens and a run of consecutive teacher tokens that end at the same byte, with no common
boundary inside. It is the finest pairing that is always correct:

    text      "  the  answer: 42"
    student   [" the"][" answer"][":"][" 4"]["2"]          (5 tokens)
    teacher   [" the"][" ans"]["wer"][":"][" "]["42"]      (6 tokens)
    groups    (" the" | " the")  (" answer" | " ans","wer")  (":" | ":")  (" 4","2" | " ","42")

A two-pointer walk over the cumulative byte ends finds the common boundaries. Byte-level tokens that split a
multi-byte character simply have boundaries inside the character; the walk never needs characters.

When the two byte strings differ (the teacher's tokenizer normalises text, e.g. Qwen's NFC; the student wrote
bytes that are not valid UTF-8 and the teacher saw U+FFFD), boundaries are matched through a byte alignment
(``difflib``): only boundaries inside identical stretches pair up, so a differing stretch becomes one coarser
group, never a wrong pairing. Tokens with no bytes (special tokens) get a group of their own with nothing on the
other side; callers give such groups no loss.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Group:
    """Student tokens ``[s_start, s_stop)`` and teacher tokens ``[t_start, t_stop)`` that cover the same text."""

    s_start: int
    s_stop: int
    t_start: int
    t_stop: int

    @property
    def one_to_one(self) -> bool:
        return self.s_stop - self.s_start == 1 and self.t_stop - self.t_start == 1

    @property
    def has_both(self) -> bool:
        return self.s_stop > self.s_start and self.t_stop > self.t_start


def align_tokens(student_bytes: Sequence[bytes], teacher_bytes: Sequence[bytes]) -> list[Group]:
    """Groups that partition both token lists, in order (every token in exactly one group).

    Args:
        student_bytes: the bytes of each student token, in order (``b""`` for special tokens).
        teacher_bytes: the bytes of each teacher token of the same text, in order.
    """
    s_keep = [i for i, b in enumerate(student_bytes) if b]
    t_keep = [j for j, b in enumerate(teacher_bytes) if b]
    s_text = b"".join(student_bytes[i] for i in s_keep)
    t_text = b"".join(teacher_bytes[j] for j in t_keep)
    s_ends = list(itertools.accumulate(len(student_bytes[i]) for i in s_keep))
    t_ends = list(itertools.accumulate(len(teacher_bytes[j]) for j in t_keep))
    cuts = _common_cuts(s_text, t_text, s_ends, t_ends)
    dense = _groups_between_cuts(cuts, s_ends, t_ends)
    return _with_empty_tokens(dense, s_keep, t_keep, len(student_bytes), len(teacher_bytes))


def _common_cuts(s_text: bytes, t_text: bytes, s_ends: list[int], t_ends: list[int]) -> list[tuple[int, int]]:
    """Byte offsets (s, t), strictly increasing on both sides, where both token lists have a boundary and the
    texts before them correspond. Always ends with (len s, len t) when both sides have text."""
    if not s_ends or not t_ends:
        return []
    if s_text == t_text:
        common = sorted(set(s_ends) & set(t_ends))
        return [(c, c) for c in common]
    t_bounds = set(t_ends)
    cuts: list[tuple[int, int]] = []
    matcher = difflib.SequenceMatcher(None, s_text, t_text, autojunk=False)
    s_iter = iter(s_ends)
    s_end = next(s_iter, None)
    for tag, i1, i2, j1, _ in matcher.get_opcodes():
        if tag != "equal":
            continue
        while s_end is not None and s_end <= i2:  # student boundaries inside (or at the ends of) this equal block
            if s_end >= i1:
                t = j1 + (s_end - i1)
                if t in t_bounds and (not cuts or (s_end > cuts[-1][0] and t > cuts[-1][1])):
                    cuts.append((s_end, t))
            s_end = next(s_iter, None)
    end = (len(s_text), len(t_text))
    if cuts and (cuts[-1][0] == end[0] or cuts[-1][1] == end[1]):
        cuts[-1] = end  # the last group absorbs a trailing difference (e.g. an inserted U+FFFD)
    elif not cuts or cuts[-1] != end:
        cuts.append(end)
    return cuts


def _groups_between_cuts(cuts: list[tuple[int, int]], s_ends: list[int], t_ends: list[int]) -> list[Group]:
    """Groups over the non-empty tokens: those ending in (previous cut, cut] on each side."""
    groups, i, j = [], 0, 0
    for s_cut, t_cut in cuts:
        i0, j0 = i, j
        while i < len(s_ends) and s_ends[i] <= s_cut:
            i += 1
        while j < len(t_ends) and t_ends[j] <= t_cut:
            j += 1
        groups.append(Group(i0, i, j0, j))
    return groups


def _with_empty_tokens(
    dense: list[Group], s_keep: list[int], t_keep: list[int], n_s: int, n_t: int
) -> list[Group]:
    """Map groups over non-empty tokens back to original indices, giving each empty token a group of its own."""
    out: list[Group] = []
    i = j = 0  # next original student / teacher index not yet placed

    def flush_empty(s_until: int, t_until: int) -> None:
        nonlocal i, j
        while i < s_until:
            out.append(Group(i, i + 1, j, j))
            i += 1
        while j < t_until:
            out.append(Group(i, i, j, j + 1))
            j += 1

    for g in dense:
        s_first, t_first = s_keep[g.s_start], t_keep[g.t_start]
        flush_empty(s_first, t_first)
        s_last, t_last = s_keep[g.s_stop - 1] + 1, t_keep[g.t_stop - 1] + 1
        out.append(Group(s_first, s_last, t_first, t_last))
        i, j = s_last, t_last
    flush_empty(n_s, n_t)
    return out
