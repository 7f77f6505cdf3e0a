"""What the teacher sees when it does not share the student's tokenizer, and which tokens pair up.

For each student rollout (student ids ``prompt_s + response_s``):

1. the response's text is rebuilt from the student's token bytes (special tokens write nothing);
2. the teacher reads ``prompt_t + encode_t(text) [+ stop_t]``: the same conversation rendered with the teacher's own
   chat template (plain template when it has none), the student's words in the teacher's tokens (special-token
   strings in the text are NOT parsed as special tokens), and the teacher's end-of-turn where the student stopped;
3. the two token lists of the text are aligned into groups (``align.align_tokens``); the student's stop and the
   teacher's stop form one more 1:1 group, so a stop the student emitted is scored as a stop.

The result, ``CrossBatch``, indexes everything by response position on each side; the losses in ``esr.train`` read
it. Template tokens are in the prompts and special tokens in the response form groups without a partner: neither
ever receives loss.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from esr.rollout.eos import end_of_turn_id
from esr.rollout.sampler import left_pad
from esr.teacher.align import Group, align_tokens
from esr.teacher.token_bytes import token_bytes_table
from esr.teacher.vocab_map import VocabMap, shared_vocab
from esr.types import Rollouts

log = logging.getLogger("esr.teacher")


@dataclass(frozen=True)
class CrossBatch:
    """Teacher-side rollouts for a batch of student rollouts and the alignment between them (rows match)."""

    teacher: Rollouts
    """Teacher prompt (its template) + the student's response text in teacher tokens (+ the teacher's stop)."""
    group_B_R: torch.Tensor
    """int64 (B, R): group of each student response token; -1 on padding and on tokens in no trainable group."""
    group_B_Rt: torch.Tensor
    """int64 (B, Rt): group of each teacher response token; -1 on padding and outside trainable groups."""
    pair_B_R: torch.Tensor
    """int64 (B, R): teacher response position of a 1:1 group's partner, -1 where the group is not 1:1."""
    exact_B_R: torch.Tensor
    """bool (B, R): 1:1 groups whose two tokens are the same token (same bytes, or the paired stops)."""
    n_groups: int
    """G: groups in the longest row (group ids are < G)."""

    @property
    def trainable_B_R(self) -> torch.Tensor:
        """bool (B, R): student tokens in a group with text on both sides and no special token (span-sampled)."""
        return self.group_B_R >= 0

    def slice(self, start: int, stop: int, n_resp: int) -> CrossBatch:
        """Rows [start, stop) with the student side cut to ``n_resp`` columns (as ``Rollouts.slice`` cuts it)."""
        teacher = self.teacher.slice(start, stop)
        n_t = teacher.response_mask_B_R.shape[1]
        return CrossBatch(
            teacher=teacher, group_B_R=self.group_B_R[start:stop, :n_resp],
            group_B_Rt=self.group_B_Rt[start:stop, :n_t], pair_B_R=self.pair_B_R[start:stop, :n_resp],
            exact_B_R=self.exact_B_R[start:stop, :n_resp], n_groups=self.n_groups,
        )


class CrossTokenizer:
    """Re-renders student rollouts for a teacher with another tokenizer and aligns the two tokenizations."""

    def __init__(
        self,
        student_tok: Any,
        teacher_tok: Any,
        *,
        student_size: int,
        teacher_size: int,
        student_eos_ids: Sequence[int],
        teacher_prompt_ids: Sequence[Sequence[int]],
    ) -> None:
        """
        Args:
            student_size, teacher_size: rows of each model's output layer.
            student_eos_ids: ids that end a student rollout.
            teacher_prompt_ids: the teacher's token ids of every training prompt, in the student's prompt order.
        """
        self.student_tok, self.teacher_tok = student_tok, teacher_tok
        self.student_eos = frozenset(int(i) for i in student_eos_ids)
        self.teacher_stop = end_of_turn_id(teacher_tok)
        self.teacher_pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else self.teacher_stop
        self.student_bytes = token_bytes_table(student_tok, student_size)
        self.teacher_bytes = token_bytes_table(teacher_tok, teacher_size)
        self.vocab_map: VocabMap = shared_vocab(
            student_tok, teacher_tok, student_size=student_size, teacher_size=teacher_size,
            student_stop=end_of_turn_id(student_tok), teacher_stop=self.teacher_stop,
            student_table=self.student_bytes, teacher_table=self.teacher_bytes,
        )
        self.teacher_prompt_ids = tuple(tuple(p) for p in teacher_prompt_ids)
        self._s_shared = self.vocab_map.student_to_shared.tolist()
        self._t_shared = self.vocab_map.teacher_to_shared.tolist()

    def with_prompts(self, teacher_prompt_ids: Sequence[Sequence[int]]) -> CrossTokenizer:
        """The same translator for another prompt set (e.g. held-out prompts), sharing the tables and vocabulary map."""
        other = copy.copy(self)
        other.teacher_prompt_ids = tuple(tuple(p) for p in teacher_prompt_ids)
        return other

    def response_text(self, response_ids: Sequence[int]) -> str:
        """The text a student response writes (special tokens write nothing; invalid UTF-8 becomes U+FFFD)."""
        return b"".join(self.student_bytes[i] for i in response_ids).decode("utf-8", errors="replace")

    def encode_teacher(self, texts: Sequence[str]) -> list[list[int]]:
        """Teacher token ids of response texts: no BOS/EOS added, special-token strings kept as plain text."""
        if not texts:
            return []
        return self.teacher_tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def translate(self, rollouts: Rollouts, prompt_indices: Sequence[int]) -> CrossBatch:
        """The teacher's rollouts and the alignment for a batch of student rollouts of prompts ``prompt_indices``."""
        lengths = rollouts.lengths_B.tolist()
        responses = [rollouts.response_ids_B_R[b, :n].tolist() for b, n in enumerate(lengths)]
        stopped = [bool(r) and r[-1] in self.student_eos and not bool(rollouts.cut_B[b])
                   for b, r in enumerate(responses)]
        bodies = [r[:-1] if stop else r for r, stop in zip(responses, stopped, strict=True)]
        teacher_bodies = self.encode_teacher([self.response_text(body) for body in bodies])
        rows = [self._align_row(body, t_body, stop)
                for body, t_body, stop in zip(bodies, teacher_bodies, stopped, strict=True)]
        teacher = self._teacher_rollouts([self.teacher_prompt_ids[i] for i in prompt_indices],
                                         [t_ids for t_ids, _ in rows], rollouts)
        return self._index(rows, responses, rollouts.response_mask_B_R.shape[1], teacher)

    def _align_row(self, body: list[int], t_body: list[int], stopped: bool) -> tuple[list[int], list[Group]]:
        groups = align_tokens([self.student_bytes[i] for i in body], [self.teacher_bytes[j] for j in t_body])
        t_ids = list(t_body)
        if stopped:
            groups.append(Group(len(body), len(body) + 1, len(t_ids), len(t_ids) + 1))
            t_ids.append(self.teacher_stop)
        return t_ids, groups

    def _teacher_rollouts(
        self, prompts: list[tuple[int, ...]], responses: list[list[int]], student: Rollouts
    ) -> Rollouts:
        ids_B_P, mask_B_P = left_pad(prompts, self.teacher_pad)
        Rt = max(1, max(len(r) for r in responses))
        resp_B_Rt = torch.full((len(responses), Rt), self.teacher_pad, dtype=torch.long)
        resp_mask_B_Rt = torch.zeros((len(responses), Rt), dtype=torch.bool)
        for b, r in enumerate(responses):
            resp_B_Rt[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            resp_mask_B_Rt[b, : len(r)] = True
        return Rollouts(
            input_ids_B_L=torch.cat([ids_B_P, resp_B_Rt], dim=1),
            attention_mask_B_L=torch.cat([mask_B_P, resp_mask_B_Rt.long()], dim=1),
            response_mask_B_R=resp_mask_B_Rt, prompt_len=ids_B_P.shape[1], horizon=student.horizon,
            cut_B=student.cut_B.clone(),
        )

    def _index(
        self, rows: list[tuple[list[int], list[Group]]], responses: list[list[int]], R: int, teacher: Rollouts
    ) -> CrossBatch:
        B, Rt = len(rows), teacher.response_mask_B_R.shape[1]
        group_B_R = torch.full((B, R), -1, dtype=torch.long)
        group_B_Rt = torch.full((B, Rt), -1, dtype=torch.long)
        pair_B_R = torch.full((B, R), -1, dtype=torch.long)
        exact_B_R = torch.zeros((B, R), dtype=torch.bool)
        s_index, t_index = self._s_shared, self._t_shared
        for b, ((t_ids, groups), s_ids) in enumerate(zip(rows, responses, strict=True)):
            for g, grp in enumerate(groups):
                s_toks = s_ids[grp.s_start : grp.s_stop]
                is_stop_group = grp.one_to_one and s_toks[0] in self.student_eos  # a stop writes no bytes
                has_text = grp.has_both and all(self.student_bytes[i] for i in s_toks)
                if not (has_text or is_stop_group):
                    continue
                group_B_R[b, grp.s_start : grp.s_stop] = g
                group_B_Rt[b, grp.t_start : grp.t_stop] = g
                if grp.one_to_one:
                    s_tok, t_tok = s_toks[0], t_ids[grp.t_start]
                    pair_B_R[b, grp.s_start] = grp.t_start
                    is_stop = s_tok in self.student_eos and t_tok == self.teacher_stop
                    exact_B_R[b, grp.s_start] = is_stop or (s_index[s_tok] >= 0 and s_index[s_tok] == t_index[t_tok])
        n_groups = max((len(groups) for _, groups in rows), default=0)
        return CrossBatch(teacher=teacher, group_B_R=group_B_R, group_B_Rt=group_B_Rt, pair_B_R=pair_B_R,
                          exact_B_R=exact_B_R, n_groups=max(1, n_groups))


def template_warnings(student_tok: Any, teacher_tok: Any, student_name: str, teacher_name: str) -> list[str]:
    """Differences between the two formats that change what gets scored, each as one sentence for the log."""
    from esr.data.template import has_chat_template

    out = []
    s_chat, t_chat = has_chat_template(student_tok), has_chat_template(teacher_tok)
    if s_chat != t_chat:
        plain, chat = (teacher_name, student_name) if s_chat else (student_name, teacher_name)
        out.append(f"'{plain}' has no chat template and reads the plain 'Question: ... Answer:' prompt while "
                   f"'{chat}' reads its chat template: the teacher judges answers written for another format")
    s_stop, t_stop = end_of_turn_id(student_tok), end_of_turn_id(teacher_tok)
    s_name, t_name = student_tok.convert_ids_to_tokens(s_stop), teacher_tok.convert_ids_to_tokens(t_stop)
    if s_name != t_name:
        out.append(f"the student ends answers with {s_name!r}, the teacher with {t_name!r}: a student stop is "
                   f"scored as the teacher's {t_name!r}")
    return out
