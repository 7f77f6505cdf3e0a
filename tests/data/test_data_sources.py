"""Prompt sources: each reader on small files, the malformed-row catalogue, errors users see, real data files."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest

from esr.config import DataConfig
from esr.data import DataError, Prompt, load_prompts

INSTRUCTION = DataConfig().instruction
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
"""`../shared/data` beside the repository (ASSETS.md, Data); the real-file tests skip when it is absent."""


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


# ----------------------------------------------------------------------------------------------------------------
# Readers on well-formed files


def test_gsm8k_prompt_is_question_plus_instruction_and_gold_follows_hashes(write_jsonl):
    path = write_jsonl([
        {"question": "How many apples?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "How much money?", "answer": "Lots.\n#### 1,234"},
    ])
    got = load_prompts(DataConfig(source="gsm8k", path=str(path)))
    assert got.prompts == (
        Prompt("data.jsonl:1", (_user(f"How many apples?\n{INSTRUCTION}"),), "7"),
        Prompt("data.jsonl:2", (_user(f"How much money?\n{INSTRUCTION}"),), "1234"),
    )
    assert (got.source, got.n_rows, got.n_skipped, got.skip_reasons) == (str(path), 2, 0, {})


def test_math_gold_is_the_answer_field_as_written_and_numbers_become_text(write_jsonl):
    path = write_jsonl([
        {"problem": "Simplify $\\frac{2}{4}$.", "solution": "...", "answer": "\\frac{1}{2}"},
        {"problem": "What is 2+3?", "answer": 5},
    ])
    got = load_prompts(DataConfig(source="math", path=str(path), instruction="Box it."))
    assert [p.messages for p in got.prompts] == [
        (_user("Simplify $\\frac{2}{4}$.\nBox it."),),
        (_user("What is 2+3?\nBox it."),),
    ]
    assert [p.answer for p in got.prompts] == ["\\frac{1}{2}", "5"]


def test_jsonl_rows_are_used_as_written_with_optional_answer(write_jsonl):
    chat = [{"role": "system", "content": "Own system."}, _user("Hi"), {"role": "assistant", "content": "Hello"},
            _user("Sum 1 and 2")]
    path = write_jsonl([{"prompt": "Write a haiku."}, {"messages": chat, "answer": "3"}])
    got = load_prompts(DataConfig(source="jsonl", path=str(path), system_prompt="Be brief."))
    first, second = got.prompts
    # system_prompt is added in front of a plain prompt, but a row's own system message wins; no instruction added
    assert first == Prompt("data.jsonl:1", ({"role": "system", "content": "Be brief."}, _user("Write a haiku.")), None)
    assert second == Prompt("data.jsonl:2", tuple(chat), "3")


def test_system_prompt_leads_math_prompts_and_empty_instruction_adds_nothing(write_jsonl):
    path = write_jsonl([{"question": "Q?", "answer": "#### 1"}])
    got = load_prompts(DataConfig(source="gsm8k", path=str(path), system_prompt="Sys", instruction=""))
    assert got.prompts[0].messages == ({"role": "system", "content": "Sys"}, _user("Q?"))


def test_limit_caps_usable_prompts_in_file_order(write_jsonl):
    rows = [{"question": f"Q{i}", "answer": f"#### {i}"} for i in range(10)]
    rows.insert(1, "not json")
    got = load_prompts(DataConfig(source="gsm8k", path=str(write_jsonl(rows)), limit=3))
    assert [p.answer for p in got.prompts] == ["0", "1", "2"]
    assert [p.id for p in got.prompts] == ["data.jsonl:1", "data.jsonl:3", "data.jsonl:4"]
    assert (got.n_rows, got.n_skipped) == (4, 1)  # reading stops once the limit is reached


def test_bom_crlf_and_blank_lines_are_not_errors(tmp_path):
    path = tmp_path / "win.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\r\n\r\n{"prompt": "b"}\r\n')
    got = load_prompts(DataConfig(source="jsonl", path=str(path)))
    assert [p.messages[0]["content"] for p in got.prompts] == ["a", "b"]
    assert [p.id for p in got.prompts] == ["win.jsonl:1", "win.jsonl:3"]
    assert (got.n_rows, got.n_skipped) == (2, 0)


# ----------------------------------------------------------------------------------------------------------------
# Malformed rows: skipped, counted by reason, reported once


def test_malformed_catalogue_is_counted_with_line_numbers(write_jsonl, caplog):
    path = write_jsonl([
        {"question": "Good one?", "answer": "#### 1"},                  # 1
        '{"question": "cut off", ',                                    # 2 invalid JSON
        {"q": "wrong names", "a": "#### 2"},                           # 3 missing field
        {"question": "   ", "answer": "#### 3"},                       # 4 empty prompt
        b'{"question": "caf\xe9", "answer": "#### 4"}',                # 5 Latin-1 byte, not UTF-8
        [1, 2, 3],                                                     # 6 not an object
        "",                                                            # 7 blank: ignored
        {"question": 5, "answer": "#### 5"},                           # 8 wrong type
        {"question": "No hashes", "answer": "6"},                      # 9 no '####'
        {"question": "Good two?", "answer": "#### 10"},                # 10
    ])
    with caplog.at_level(logging.WARNING, logger="esr.data"):
        got = load_prompts(DataConfig(source="gsm8k", path=str(path)))
    assert [p.id for p in got.prompts] == ["data.jsonl:1", "data.jsonl:10"]
    assert (got.n_rows, got.n_skipped, got.skipped_lines) == (9, 7, (2, 3, 4, 5, 6, 8, 9))
    assert got.skip_reasons == {
        "invalid JSON": 1, "missing field 'question'": 1, "empty field 'question'": 1, "not UTF-8": 1,
        "not a JSON object": 1, "field 'question' is not a string": 1, "field 'answer' has no '#### N'": 1,
    }
    [record] = [r for r in caplog.records if r.name == "esr.data"]
    assert record.getMessage().startswith(f"skipped 7 of 9 rows in {path} (invalid JSON: 1, ")
    assert record.getMessage().endswith("; first bad lines: 2, 3, 4, 5, 6, 8, 9")


def test_skip_report_keeps_first_ten_lines_and_sorts_reasons_by_count(write_jsonl, caplog):
    rows = ["{bad"] * 12 + [{"prompt": ""}] * 3 + [{"prompt": "ok"}]
    with caplog.at_level(logging.WARNING, logger="esr.data"):
        got = load_prompts(DataConfig(source="jsonl", path=str(write_jsonl(rows))))
    assert got.n_skipped == 15 and got.skipped_lines == tuple(range(1, 11))
    assert "(invalid JSON: 12, empty field 'prompt': 3)" in caplog.text


def test_jsonl_messages_must_be_chat_turns(write_jsonl):
    path = write_jsonl([
        {"messages": "hello"},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "system", "content": "only system"}]},
        {"messages": [_user("fine")], "answer": ["not", "text"]},
        {"text": "no prompt"},
        {"prompt": "fine"},
    ])
    got = load_prompts(DataConfig(source="jsonl", path=str(path)))
    assert got.skip_reasons == {
        "field 'messages' is not a non-empty list": 1,
        "a message is not an object with string 'role' and 'content'": 1,
        "field 'messages' has no non-empty user turn": 1,
        "field 'answer' is not a string or number": 1,
        "missing field 'prompt', 'question', 'problem' or 'messages'": 1,
    }
    assert [p.id for p in got.prompts] == ["data.jsonl:6"]


def test_jsonl_takes_the_prompt_from_question_or_problem_as_the_readme_says(write_jsonl):
    """README: `jsonl` rows have `question`/`problem`/`prompt` and `answer` (a GSM8K-style file works as is)."""
    path = write_jsonl([
        {"question": "How many legs has a cat?", "answer": "4"},
        {"problem": "What is $1+1$?", "answer": 2},
        {"prompt": "Say hi."},
        {"questoin": "typo"},
    ])
    got = load_prompts(DataConfig(source="jsonl", path=str(path)))
    assert [p.messages[-1]["content"] for p in got.prompts] == ["How many legs has a cat?", "What is $1+1$?", "Say hi."]
    assert [p.answer for p in got.prompts] == ["4", "2", None]
    assert got.skip_reasons == {"missing field 'prompt', 'question', 'problem' or 'messages' (found 'questoin')": 1}


def test_all_bad_file_error_names_file_counts_lines_and_expected_fields(write_jsonl):
    path = write_jsonl(["oops", {"problem": "x"}, {"question": "q", "answer": "#### 1"}, {"question": "r"}])
    with pytest.raises(DataError) as err:
        load_prompts(DataConfig(source="math", path=str(path)))
    message = str(err.value)
    assert f"no usable prompts in {path}" in message
    assert "4 of 4 rows skipped" in message
    assert "(missing field 'problem': 2, invalid JSON: 1, missing field 'answer': 1)" in message
    assert "first bad lines: 1, 2, 3, 4" in message
    assert "'problem' and 'answer'" in message


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no usable prompts in .*empty.jsonl: it has no rows"):
        load_prompts(DataConfig(source="jsonl", path=str(path)))


# ----------------------------------------------------------------------------------------------------------------
# Configuration errors


def test_missing_file_error_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"data file not found: {missing}"):
        load_prompts(DataConfig(source="gsm8k", path=str(missing)))
    with pytest.raises(DataError, match="is not a file"):
        load_prompts(DataConfig(source="gsm8k", path=str(tmp_path)))
    with pytest.raises(DataError, match="set data.path"):
        load_prompts(DataConfig(source="math"))


def test_unknown_source_suggests_the_closest_and_lists_all():
    with pytest.raises(DataError) as err:
        load_prompts(DataConfig(source="gsm8kk"))
    assert "unknown data.source 'gsm8kk'. Did you mean 'gsm8k'?" in str(err.value)
    assert "gsm_symbolic, gsm8k, math, jsonl, glaive, bfcl:<category>[,<category>], hf:<dataset>" in str(err.value)


def test_limit_below_one_is_rejected():
    with pytest.raises(DataError, match="data.limit must be at least 1"):
        load_prompts(DataConfig(limit=0))


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face datasets (offline: a real local dataset folder, the missing library, and a stand-in module for the
# hub ids, config names and failures that need the hub)


def test_hf_reads_a_local_dataset_folder_with_the_real_library(tmp_path):
    pytest.importorskip("datasets", reason="the [hf] extra: pip install -e '.[hf]' (the [test] extra includes it)")
    folder = tmp_path / "my_gsm"
    folder.mkdir()
    rows = [{"question": "Q1?", "answer": "so #### 1,000"}, {"question": "Q2?", "answer": "no marker"}]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    got = load_prompts(DataConfig(source=f"hf:{folder}", split="train", instruction=""))
    assert got.prompts == (Prompt(f"{folder}/train:1", (_user("Q1?"),), "1000"),)
    assert got.skip_reasons == {"field 'answer' has no '#### N'": 1}


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        load_prompts(DataConfig(source="hf:openai/gsm8k"))


class _FakeDataset(list):
    @property
    def column_names(self) -> list[str]:
        return list(self[0])


def _fake_datasets(monkeypatch, rows, calls):
    def load_dataset(name, subset, split):
        calls.append((name, subset, split))
        if name == "missing/set":
            raise FileNotFoundError("no such dataset")
        return _FakeDataset(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hf_detects_gsm8k_columns_and_passes_subset_and_split(monkeypatch):
    calls: list[tuple] = []
    _fake_datasets(monkeypatch, [{"question": "Q?", "answer": "... #### 72"}], calls)
    got = load_prompts(DataConfig(source="hf:openai/gsm8k:main", split="test", instruction=""))
    assert calls == [("openai/gsm8k", "main", "test")]
    assert got.prompts == (Prompt("openai/gsm8k:main/test:1", (_user("Q?"),), "72"),)
    assert got.source == "hf:openai/gsm8k:main[test]"


def test_hf_generic_prompt_columns_and_unknown_columns(monkeypatch):
    _fake_datasets(monkeypatch, [{"prompt": "Say hi", "id": 3}], [])
    assert load_prompts(DataConfig(source="hf:me/prompts")).prompts[0].messages == (_user("Say hi"),)
    _fake_datasets(monkeypatch, [{"text": "x", "label": 1}], [])
    with pytest.raises(DataError, match=r"cannot tell the format .*\['label', 'text'\]"):
        load_prompts(DataConfig(source="hf:me/other"))
    with pytest.raises(DataError, match="could not load dataset 'missing/set' split 'train': no such dataset"):
        load_prompts(DataConfig(source="hf:missing/set"))


# ----------------------------------------------------------------------------------------------------------------
# gsm_symbolic generator (the offline default)


def test_gsm_symbolic_is_deterministic_for_a_seed_and_carries_gold():
    import reasoning_gym

    first = load_prompts(DataConfig(size=8, seed=3))
    again = load_prompts(DataConfig(size=8, seed=3))
    other = load_prompts(DataConfig(size=8, seed=4))
    assert first.prompts == again.prompts
    assert [p.messages for p in first.prompts] != [p.messages for p in other.prompts]
    items = list(reasoning_gym.create_dataset("gsm_symbolic", size=8, seed=3))
    assert [p.answer for p in first.prompts] == [it["metadata"]["answer_cot"].rsplit("####", 1)[1].strip()
                                                 for it in items]
    assert [p.messages[0]["content"] for p in first.prompts] == [f"{it['question']}\n{INSTRUCTION}" for it in items]
    assert [p.id for p in first.prompts] == [f"gsm_symbolic:3:{i}" for i in range(8)]
    assert (first.n_rows, first.n_skipped, first.source) == (8, 0, "gsm_symbolic(size=8, seed=3)")


def test_gsm_symbolic_limit_and_size():
    assert len(load_prompts(DataConfig(size=6, limit=4)).prompts) == 4
    with pytest.raises(DataError, match="data.size must be at least 1"):
        load_prompts(DataConfig(size=0))


# ----------------------------------------------------------------------------------------------------------------
# The real data files (../shared/data), read in full


@pytest.mark.parametrize(
    ("source", "relpath", "n_rows", "first_gold"),
    [
        ("gsm8k", "gsm8k/test.jsonl", 1319, "18"),
        ("gsm8k", "gsm8k/train.jsonl", 7473, "72"),
        ("math", "math500/test.jsonl", 500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ],
)
def test_real_files_read_fully_with_gold(source, relpath, n_rows, first_gold):
    path = SHARED_DATA / relpath
    if not path.is_file():
        pytest.skip(f"{path} not present on this machine (see ASSETS.md, Data)")
    got = load_prompts(DataConfig(source=source, path=str(path)))
    assert (len(got.prompts), got.n_rows, got.n_skipped) == (n_rows, n_rows, 0)
    assert got.prompts[0].answer == first_gold
    assert all(p.answer for p in got.prompts)
