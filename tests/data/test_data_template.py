"""Chat templating and tokenising with the real SmolLM2 tokenizer: exact text, BOS never doubled, length limits."""

from __future__ import annotations

import copy
import logging

import pytest

from esr.data import DataError, Prompt, default_bos_id, has_chat_template, render_prompt, tokenize_prompts

IM_START = 1  # SmolLM2's <|im_start|>, which is also its bos_token


def _prompt(text: str, pid: str = "p", system: str | None = None) -> Prompt:
    messages = ({"role": "system", "content": system},) if system else ()
    return Prompt(pid, (*messages, {"role": "user", "content": text}), None)


# ----------------------------------------------------------------------------------------------------------------
# render_prompt


def test_chat_template_opens_the_assistant_turn(smollm2_tokenizer):
    text = render_prompt(smollm2_tokenizer, [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "2+2?"}])
    assert has_chat_template(smollm2_tokenizer)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_chat_template_without_system_uses_the_model_default(smollm2_tokenizer):
    text = render_prompt(smollm2_tokenizer, _prompt("2+2?").messages)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_plain_template_single_turn_and_system(plain_tokenizer):
    assert not has_chat_template(plain_tokenizer)
    assert render_prompt(plain_tokenizer, _prompt(" 2+2? ").messages) == "Question: 2+2?\nAnswer:"
    assert render_prompt(plain_tokenizer, _prompt("2+2?", system="Be brief.").messages) == (
        "Be brief.\n\nQuestion: 2+2?\nAnswer:"
    )


def test_plain_template_multi_turn_ends_with_assistant(plain_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"}]
    assert render_prompt(plain_tokenizer, messages) == "User: Hi\nAssistant: Hello!\nUser: 2+2?\nAssistant:"


# ----------------------------------------------------------------------------------------------------------------
# tokenize_prompts: special tokens


def test_chat_ids_match_apply_chat_template_with_one_bos(smollm2_tokenizer):
    prompts = [_prompt("What is 2+2?", "a"), _prompt("Name a colour.", "b", system="Be brief.")]
    got = tokenize_prompts(prompts, smollm2_tokenizer, max_tokens=512)
    for prompt, ids in zip(prompts, got.ids, strict=True):
        expected = smollm2_tokenizer.apply_chat_template(
            list(prompt.messages), tokenize=True, add_generation_prompt=True, return_dict=True
        )["input_ids"]
        assert list(ids) == list(expected)
        assert ids[0] == IM_START and ids[1] != IM_START
    assert (got.prompts, got.n_too_long, got.n_empty) == (tuple(prompts), 0, 0)


def test_chat_template_is_not_given_a_second_bos_by_the_tokenizer(smollm2_tokenizer, bos_tokenizer):
    chat_with_bos = copy.deepcopy(bos_tokenizer)
    assert chat_with_bos("a")["input_ids"][0] == IM_START
    chat_with_bos.chat_template = smollm2_tokenizer.chat_template
    prompts = [_prompt("What is 2+2?")]
    assert tokenize_prompts(prompts, chat_with_bos, 64).ids == tokenize_prompts(prompts, smollm2_tokenizer, 64).ids


def test_plain_template_adds_no_bos_when_the_tokenizer_adds_none(plain_tokenizer, bos_tokenizer):
    # bos_tokenizer is requested too, to show that switching BOS on in a copy leaves this one alone
    got = tokenize_prompts([_prompt("What is 2+2?")], plain_tokenizer, max_tokens=64)
    assert default_bos_id(plain_tokenizer) is None
    assert got.ids[0][0] != IM_START
    assert plain_tokenizer.decode(got.ids[0]) == "Question: What is 2+2?\nAnswer:"


def test_plain_template_gets_exactly_one_bos_when_the_tokenizer_adds_one(plain_tokenizer, bos_tokenizer):
    prompts = [_prompt("What is 2+2?")]
    plain = tokenize_prompts(prompts, plain_tokenizer, max_tokens=64).ids[0]
    with_bos = tokenize_prompts(prompts, bos_tokenizer, max_tokens=64).ids[0]
    assert default_bos_id(bos_tokenizer) == IM_START
    assert with_bos == (IM_START, *plain)


# ----------------------------------------------------------------------------------------------------------------
# tokenize_prompts: dropping and counting


def test_too_long_prompts_are_dropped_and_counted_in_order(plain_tokenizer, caplog):
    short, long_ = "one two", " ".join(["word"] * 50)
    prompts = [_prompt(short, "s1"), _prompt(long_, "l1"), _prompt(short, "s2"), _prompt(long_, "l2")]
    limit = len(tokenize_prompts([prompts[0]], plain_tokenizer, 10_000).ids[0])
    with caplog.at_level(logging.WARNING, logger="esr.data"):
        got = tokenize_prompts(prompts, plain_tokenizer, max_tokens=limit)
    assert [p.id for p in got.prompts] == ["s1", "s2"]
    assert (got.n_too_long, got.n_empty, len(got.ids)) == (2, 0, 2)
    assert all(len(ids) <= limit for ids in got.ids)
    assert f"dropped 2 of 4 prompts: 2 longer than data.max_prompt_tokens={limit}" in caplog.text


def test_prompt_exactly_at_the_limit_is_kept(smollm2_tokenizer):
    prompt = _prompt("What is 2+2?")
    n = len(tokenize_prompts([prompt], smollm2_tokenizer, 10_000).ids[0])
    assert tokenize_prompts([prompt], smollm2_tokenizer, n).n_too_long == 0
    with pytest.raises(DataError):
        tokenize_prompts([prompt], smollm2_tokenizer, n - 1)


def test_empty_prompts_are_dropped_and_counted(smollm2_tokenizer):
    got = tokenize_prompts([_prompt("   ", "e", system="sys"), _prompt("Hi", "h")], smollm2_tokenizer, 512)
    assert [p.id for p in got.prompts] == ["h"]
    assert (got.n_empty, got.n_too_long) == (1, 0)


def test_all_dropped_error_names_the_setting(plain_tokenizer):
    with pytest.raises(DataError) as err:
        tokenize_prompts([_prompt("a b c d e f g h"), _prompt("")], plain_tokenizer, max_tokens=3)
    message = str(err.value)
    assert "all 2 prompts were dropped: 1 longer than data.max_prompt_tokens=3" in message
    assert "1 empty" in message and "Raise data.max_prompt_tokens" in message


def test_bad_budget_and_no_prompts_are_errors(plain_tokenizer):
    with pytest.raises(DataError, match="data.max_prompt_tokens must be at least 1"):
        tokenize_prompts([_prompt("x")], plain_tokenizer, max_tokens=0)
    with pytest.raises(DataError, match="no prompts"):
        tokenize_prompts([], plain_tokenizer, max_tokens=8)
