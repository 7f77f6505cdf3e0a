"""The part of two vocabularies that both tokenizers share, as paired logit columns.

``aligned-exact`` compares the two next-token distributions on tokens that exist in both vocabularies: a student
token and a teacher token are the same when they write the same bytes (``Ġthe`` in a byte-level BPE and ``▁the`` in
SentencePiece are both b" the"), or are special tokens with the same name (``<|im_start|>``). The student's
end-of-turn tokens are paired with the teacher's end-of-turn, so "stop here" is one outcome on both sides.

Both distributions are restricted to the K shared tokens and renormalised there:

    p'_s(v) = p_s(v) / sum_{u in shared} p_s(u)    (= softmax of the student's logits gathered at ``student_cols``)

and the divergence (reverse KL by default) is taken between p'_s and p'_t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from esr.teacher.token_bytes import special_token_ids, token_bytes_table


@dataclass(frozen=True)
class VocabMap:
    """Shared tokens k = 0..K-1: student id ``student_cols[k]`` is teacher id ``teacher_cols[k]``."""

    student_cols_K: torch.Tensor
    teacher_cols_K: torch.Tensor
    student_to_shared: torch.Tensor
    """(V_student,) int64: index k of each student id in the shared set, -1 when it has no teacher twin."""
    teacher_to_shared: torch.Tensor
    """(V_teacher,) int64: the same for teacher ids."""

    def __len__(self) -> int:
        return int(self.student_cols_K.numel())

    def restrict(
        self, student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_W: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both models' logits on the shared tokens only, (B, T, K) each, column k the same token on both sides.
        A log_softmax over them is the renormalised distribution p' of the module docstring."""
        return (student_logits_B_T_V.index_select(-1, self.student_cols_K),
                teacher_logits_B_T_W.index_select(-1, self.teacher_cols_K))

    def to(self, device: torch.device) -> VocabMap:
        return VocabMap(*(t.to(device) for t in (self.student_cols_K, self.teacher_cols_K, self.student_to_shared,
                                                  self.teacher_to_shared)))


def _keys(tokenizer: Any, table: Sequence[bytes]) -> dict[object, int]:
    """Token key -> id: the bytes for text tokens, ("special", name) for special ones. When several ids write the
    same bytes (SentencePiece byte-fallback ``<0x41>`` and ``A``), the lowest regular id wins."""
    special = special_token_ids(tokenizer)
    keys: dict[object, int] = {}
    for i, b in enumerate(table):
        if i in special:
            name = tokenizer.convert_ids_to_tokens(i)
            keys.setdefault(("special", name), i)
        elif b:
            keys.setdefault(b, i)
    return keys


def shared_vocab(
    student_tok: Any,
    teacher_tok: Any,
    *,
    student_size: int,
    teacher_size: int,
    student_stop: int,
    teacher_stop: int,
    student_table: Sequence[bytes] | None = None,
    teacher_table: Sequence[bytes] | None = None,
) -> VocabMap:
    """Pair every student id with the teacher id writing the same token, and the two end-of-turn ids together.

    Args:
        student_size, teacher_size: rows of each model's output layer (logit columns).
        student_stop, teacher_stop: each side's end-of-turn id (a stop the student emits is scored as the
            teacher's stop). Same-named stops (both ChatML ``<|im_end|>``) pair by name anyway.
    """
    s_table = student_table if student_table is not None else token_bytes_table(student_tok, student_size)
    t_table = teacher_table if teacher_table is not None else token_bytes_table(teacher_tok, teacher_size)
    s_keys, t_keys = _keys(student_tok, s_table), _keys(teacher_tok, t_table)
    pairs = {s_id: t_keys[k] for k, s_id in s_keys.items() if k in t_keys}
    pairs = {s: t for s, t in pairs.items() if s != student_stop and t != teacher_stop}  # keep the map 1:1
    pairs[student_stop] = teacher_stop
    s_cols = torch.tensor(sorted(pairs), dtype=torch.long)
    t_cols = torch.tensor([pairs[s] for s in s_cols.tolist()], dtype=torch.long)
    s_index = torch.full((student_size,), -1, dtype=torch.long)
    t_index = torch.full((teacher_size,), -1, dtype=torch.long)
    s_index[s_cols] = torch.arange(len(s_cols))
    t_index[t_cols] = torch.arange(len(t_cols))
    return VocabMap(s_cols, t_cols, s_index, t_index)
