"""Re-rendering for a teacher with another tokenizer, its stop mapping, the shared vocabulary, hand-worked losses."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from esr.data.sources import Prompt
from esr.data.template import tokenize_prompts
from esr.losses import reverse_kl
from esr.rollout.eos import end_of_turn_id, eos_token_ids
from esr.rollout.sampler import build_rollouts, left_pad
from esr.teacher.cross import CrossTokenizer, template_warnings
from esr.teacher.targets import span_advantage
from esr.teacher.vocab_map import VocabMap
from esr.types import Rollouts

PROMPT = Prompt(id="q", messages=({"role": "user", "content": "What is 6 * 7?"},), answer="42")
ANSWER = "6 * 7 = 42. The answer is \\boxed{42} 🙂"


def student_rollouts(tok: Any, prompt_ids: tuple[int, ...], responses: list[list[int]], eos: list[int]) -> Rollouts:
    ids_B_P, mask_B_P = left_pad([prompt_ids] * len(responses), tok.pad_token_id)
    R = max(len(r) for r in responses)
    new_B_R = torch.full((len(responses), R), tok.pad_token_id, dtype=torch.long)
    for b, r in enumerate(responses):
        new_B_R[b, : len(r)] = torch.tensor(r)
    return build_rollouts(ids_B_P, mask_B_P, new_B_R, eos, horizon=R)


_CROSS: dict[tuple[int, int], tuple[CrossTokenizer, tuple[int, ...], list[int]]] = {}


def make_cross(s_tok: Any, t_tok: Any) -> tuple[CrossTokenizer, tuple[int, ...], list[int]]:
    if (id(s_tok), id(t_tok)) not in _CROSS:
        _CROSS[id(s_tok), id(t_tok)] = _make_cross(s_tok, t_tok)
    return _CROSS[id(s_tok), id(t_tok)]


def _make_cross(s_tok: Any, t_tok: Any) -> tuple[CrossTokenizer, tuple[int, ...], list[int]]:
    s_prompt = tokenize_prompts([PROMPT], s_tok, 512).ids[0]
    t_prompt = tokenize_prompts([PROMPT], t_tok, 512).ids[0]
    eos = eos_token_ids(s_tok)
    cross = CrossTokenizer(s_tok, t_tok, student_size=len(s_tok), teacher_size=len(t_tok), student_eos_ids=eos,
                           teacher_prompt_ids=[t_prompt])
    return cross, s_prompt, eos


def test_teacher_reads_its_template_the_answer_and_its_stop(smollm2_tok: Any, qwen_tok: Any) -> None:
    cross, s_prompt, eos = make_cross(smollm2_tok, qwen_tok)
    body = smollm2_tok(ANSWER, add_special_tokens=False)["input_ids"]
    stop = end_of_turn_id(smollm2_tok)
    cut = (body * 2)[: len(body) + 1]  # as long as the horizon, no stop
    batch = cross.translate(student_rollouts(smollm2_tok, s_prompt, [[*body, stop], cut], eos), [0, 0])

    t_prompt = qwen_tok.apply_chat_template([dict(m) for m in PROMPT.messages], add_generation_prompt=True,
                                            tokenize=False)
    teacher_ids = batch.teacher.input_ids_B_L[0][batch.teacher.attention_mask_B_L[0].bool()].tolist()
    expected = [*qwen_tok(t_prompt, add_special_tokens=False)["input_ids"],
                *qwen_tok(ANSWER, add_special_tokens=False)["input_ids"], qwen_tok.convert_tokens_to_ids("<|im_end|>")]
    assert teacher_ids == expected  # Qwen's own system prompt and template, the answer in Qwen tokens, Qwen's stop
    n_t = len(qwen_tok(ANSWER, add_special_tokens=False)["input_ids"])
    # Row 0 stopped: its stop is a 1:1 exact group paired with the teacher's stop.
    assert batch.exact_B_R[0, len(body)] and batch.pair_B_R[0, len(body)] == n_t
    # Row 1 was cut by the horizon: no stop appended, only its text.
    assert bool(batch.teacher.cut_B[1])
    n_cut = len(qwen_tok(cross.response_text(cut), add_special_tokens=False)["input_ids"])
    assert batch.teacher.response_mask_B_R[1].sum() == n_cut
    assert batch.teacher.response_ids_B_R[1, n_cut - 1] != qwen_tok.convert_tokens_to_ids("<|im_end|>")
    # Every exact position pairs tokens writing the same bytes.
    for i in batch.exact_B_R[0, : len(body)].nonzero().flatten().tolist():
        j = int(batch.pair_B_R[0, i])
        assert cross.student_bytes[body[i]] == cross.teacher_bytes[batch.teacher.response_ids_B_R[0, j]]
    assert 0.5 < batch.exact_B_R[0].float().mean() < 1.0  # most, but not all, SmolLM2 tokens have a Qwen twin


def test_special_tokens_and_special_strings_never_get_loss(smollm2_tok: Any, qwen_tok: Any) -> None:
    cross, s_prompt, eos = make_cross(smollm2_tok, qwen_tok)
    im_start = smollm2_tok.convert_tokens_to_ids("<|im_start|>")
    text_ids = smollm2_tok("ok <|im_end|> go", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    response = [*text_ids[:1], im_start, *text_ids[1:]]
    batch = cross.translate(student_rollouts(smollm2_tok, s_prompt, [response], eos), [0])
    assert batch.group_B_R[0, 1] == -1 and not batch.exact_B_R[0, 1]  # the special token: no group, no loss
    t_resp = batch.teacher.response_ids_B_R[0][batch.teacher.response_mask_B_R[0]].tolist()
    assert qwen_tok.convert_tokens_to_ids("<|im_end|>") not in t_resp  # "<|im_end|>" typed as text stays text
    assert qwen_tok.decode(t_resp) == "ok <|im_end|> go"


def test_base_student_stop_maps_to_the_teacher_end_of_turn(gemma_tok: Any, qwen_tok: Any) -> None:
    cross, s_prompt, eos = make_cross(gemma_tok, qwen_tok)
    assert s_prompt[0] == gemma_tok.bos_token_id and gemma_tok.decode(s_prompt[1:]).startswith("Question: ")
    body = gemma_tok(" " + ANSWER, add_special_tokens=False)["input_ids"]
    batch = cross.translate(student_rollouts(gemma_tok, s_prompt, [[*body, gemma_tok.eos_token_id]], eos), [0])
    n_t = int(batch.teacher.response_mask_B_R[0].sum())
    assert batch.teacher.response_ids_B_R[0, n_t - 1] == qwen_tok.convert_tokens_to_ids("<|im_end|>")
    assert batch.exact_B_R[0, len(body)] and batch.pair_B_R[0, len(body)] == n_t - 1
    stop_k = cross.vocab_map.student_to_shared[gemma_tok.eos_token_id]
    assert cross.vocab_map.teacher_cols_K[stop_k] == qwen_tok.convert_tokens_to_ids("<|im_end|>")
    warnings = template_warnings(gemma_tok, qwen_tok, "gemma-3-270m", "qwen")
    assert len(warnings) == 2 and "no chat template" in warnings[0] and "'<eos>'" in warnings[1]


def test_shared_vocabulary_is_one_to_one(smollm2_tok: Any, gemma_tok: Any, qwen_tok: Any) -> None:
    for s_tok in (smollm2_tok, gemma_tok):
        vm = make_cross(s_tok, qwen_tok)[0].vocab_map
        assert len(set(vm.student_cols_K.tolist())) == len(vm) == len(set(vm.teacher_cols_K.tolist()))
        assert (vm.student_to_shared[vm.student_cols_K] == torch.arange(len(vm))).all()
        assert (vm.teacher_to_shared[vm.teacher_cols_K] == torch.arange(len(vm))).all()
    s_the, t_the = smollm2_tok.convert_tokens_to_ids("Ġthe"), qwen_tok.convert_tokens_to_ids("Ġthe")
    vm = make_cross(gemma_tok, qwen_tok)[0].vocab_map
    assert vm.teacher_cols_K[vm.student_to_shared[gemma_tok.convert_tokens_to_ids("▁the")]] == t_the  # ▁ is Ġ
    assert make_cross(smollm2_tok, qwen_tok)[0].vocab_map.student_to_shared[s_the] >= 0


def test_hand_worked_shared_vocabulary_kl() -> None:
    # Student tokens [A, B, C, stop], teacher tokens [B, A, X, stop']; shared: A, B, stop<->stop'.
    vm = VocabMap(torch.tensor([0, 1, 3]), torch.tensor([1, 0, 3]), torch.tensor([0, 1, -1, 2]),
                  torch.tensor([1, 0, -1, 2]))
    p_s, p_t = torch.tensor([0.5, 0.2, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.2, 0.2])
    s_logits, t_logits = vm.restrict(p_s.log().view(1, 1, 4), p_t.log().view(1, 1, 4))
    # Renormalised on the shared tokens: p'_s = [.625, .25, .125] (A, B, stop), p'_t = [.375, .375, .25].
    expected = 0.625 * math.log(0.625 / 0.375) + 0.25 * math.log(0.25 / 0.375) + 0.125 * math.log(0.125 / 0.25)
    assert reverse_kl(s_logits, t_logits).item() == pytest.approx(expected, abs=1e-6)  # 0.13125...


def test_hand_worked_span_advantage() -> None:
    # Student tokens s0 s1 | s2 (groups 0, 0, 1), teacher tokens t0 | t1 t2 (groups 0, 1, 1), then padding.
    student_logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    teacher_logp = torch.tensor([[-2.5, -0.25, -0.75, 0.0]])
    advantage, kl = span_advantage(student_logp, teacher_logp, torch.tensor([[0, 0, 1, -1]]),
                                   torch.tensor([[0, 1, 1, -1]]), 2)
    # A_0 = -2.5 - (-1 - 2) = 0.5;  A_1 = (-0.25 - 0.75) - (-0.5) = -0.5.  KL estimate -A_g spread over g's tokens.
    assert advantage.tolist() == [[0.5, 0.5, -0.5, 0.0]]
    assert kl.tolist() == [[-0.25, -0.25, 0.5, 0.0]]
