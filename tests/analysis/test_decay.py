"""Decay probe: the pure pieces (Delta, avg@n, prefixes) on hand data, and an end-to-end run with a tiny pair where
the ids the teacher is given are recorded and checked against the student's own rollout tokens."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from esr.analysis.decay import (
    accuracy_by_k,
    decay_probe,
    normalize_ks,
    prefix_for,
    recoverability_gap,
    run_decay,
    truncation_warning,
)
from esr.config import ConfigError
from esr.eval.tasks import make_task
from esr.models import load_model
from esr.rollout.eos import eos_token_ids


def test_gap_accuracy_prefixes_and_ks_on_hand_data():
    gap = recoverability_gap({0: 0.75, 25: 0.5, 50: 0.25, 100: 1.0})
    assert gap == {0: 0.0, 25: 0.25, 50: 0.5, 100: -0.25}  # > 0: the student prefix cost the teacher accuracy
    with pytest.raises(ValueError, match="k = 0"):
        recoverability_gap({25: 0.5})
    # 2 problems x 2 samples per k: avg@2 is the mean over all four
    records = [{"k": k, "correct": c} for k, cs in ((0, [1, 1, 1, 0]), (8, [0, 1, 0, 0])) for c in cs]
    assert accuracy_by_k(records) == {0: 0.75, 8: 0.25}
    eos = 2
    assert prefix_for([5, 6, eos], True, 2) == ([5, 6], False)
    assert prefix_for([5, 6, eos], True, 3) == ([5, 6, eos], True)  # ended within k: the full answer, complete
    assert prefix_for([5, 6, eos], True, 10) == ([5, 6, eos], True)
    assert prefix_for([5, 6, 7, 8], False, 2) == ([5, 6], False)
    assert prefix_for([5, 6, 7, 8], False, 0) == ([], False)
    assert truncation_warning({0: {"cut_share": 0.0}, 8: {"cut_share": 0.1}}, 64) is None
    warning = truncation_warning({0: {"cut_share": 0.625}, 8: {"cut_share": 0.25}}, 64)
    assert "max_new_tokens=64" in warning and "k=0: 62%" in warning and "k=8: 25%" in warning
    assert normalize_ks((8, 4, 4)) == (0, 4, 8)
    with pytest.raises(ValueError, match=">= 0"):
        normalize_ks((-1, 4))


def record_generate(model, calls, edit=None):
    """Wrap model.generate: record (non-pad input ids per row, new tokens per row) of every call."""
    original = model.generate

    def generate(**kw):
        out = original(**kw)
        P = kw["input_ids"].shape[1]
        if edit is not None:
            out = edit(out, P)
        for row in range(out.shape[0]):
            calls.append((kw["input_ids"][row][kw["attention_mask"][row].bool()].tolist(), out[row, P:].tolist()))
        return out

    model.generate = generate


def until_eos(tokens, eos):
    """Tokens up to and including the first EOS (all of them without one)."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1], True
    return tokens, False


def test_teacher_continues_exactly_the_first_k_student_tokens():
    student, tok = load_model("tiny-student")
    teacher, _ = load_model("tiny-teacher")
    s_eos, t_eos = eos_token_ids(tok, student), eos_token_ids(tok, teacher)

    def stop_first_row_early(out, P):  # problem 0's student answer ends with EOS as its 3rd token
        out = out.clone()
        if not student_calls:
            out[0, P + 2] = s_eos[0]
        return out

    student_calls, teacher_calls = [], []
    record_generate(student, student_calls, edit=stop_first_row_early)
    record_generate(teacher, teacher_calls)
    task = make_task("gsm_symbolic")
    r = decay_probe(student, teacher, tok, task, ks=(0, 4, 8), limit=3, max_new_tokens=5, batch_size=2, seed=1)
    assert r.ks == (0, 4, 8) and r.problems == 3 and len(r.records) == 9
    assert all(0.0 <= a <= 1.0 for a in r.accuracy.values()) and r.gap[0] == 0.0
    prompts = [p for p, _ in student_calls]
    answers = [until_eos(new, s_eos) for _, new in student_calls]
    assert answers[0] == (answers[0][0][:3], True) and len(answers[0][0]) == 3
    assert all(len(a) == 8 and not ended for a, ended in answers[1:])  # K = max(ks) tokens, no EOS
    # what the teacher was fed: prompt + first k student tokens, for every (k, problem) whose prefix is incomplete
    expected = [(k, i) for k in (0, 4, 8) for i in range(3) if not (i == 0 and k >= 3)]
    assert [p for p, _ in teacher_calls] == [prompts[i] + answers[i][0][:k] for k, i in expected]
    for (k, i), (fed, new) in zip(expected, teacher_calls, strict=True):
        prompt_text, prefix_text = tok.decode(prompts[i]), tok.decode(answers[i][0][:k])
        assert tok.decode(fed).startswith(prompt_text)
        assert tok.decode(fed)[len(prompt_text):] == prefix_text
        rec = next(x for x in r.records if x["k"] == k and x["id"] == r.records[i]["id"])
        cont, ended = until_eos(new, t_eos)
        assert rec["prefix"] == tok.decode(answers[i][0][:k], skip_special_tokens=True)
        assert rec["response"] == tok.decode(answers[i][0][:k] + cont, skip_special_tokens=True)
        assert (rec["prefix_tokens"], rec["continuation_tokens"], rec["cut"]) == (k, len(cont), not ended)
    for k in (4, 8):  # problem 0's student answer ended within k tokens: judged whole, no teacher call
        rec = next(x for x in r.records if x["k"] == k and x["id"] == r.records[0]["id"])
        assert rec["prefix_complete"] and rec["continuation_tokens"] == 0
        assert rec["response"] == tok.decode(answers[0][0], skip_special_tokens=True)
    assert r.per_k[4]["prefix_complete_share"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="n = 1"):
        decay_probe(student, teacher, tok, task, ks=(0,), limit=1, n=2, temperature=0.0)


def test_run_decay_end_to_end_writes_files(tmp_path):
    r = run_decay("configs/smoke.yaml", tmp_path, ks=(0, 4, 8), limit=2, n=2, temperature=1.0, max_new_tokens=4,
                  progress=False)
    summary = json.loads((tmp_path / "decay.json").read_text())
    assert summary["ks"] == [0, 4, 8] and summary["gap"]["0"] == 0.0
    assert all(0.0 <= v <= 1.0 for v in summary["accuracy"].values())
    assert summary["prefix_source"] == "student" and summary["mirror"] is False
    assert summary["warnings"] == r.warnings and "max_new_tokens=4" in r.warnings[0]  # tiny models never stop
    lines = (tmp_path / "decay_samples.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 2 * 2 == len(r.records)  # ks x problems x n
    assert (tmp_path / "decay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mirror = run_decay("configs/smoke.yaml", tmp_path / "mirror", ks=(4,), limit=1, max_new_tokens=3, mirror=True,
                       progress=False)
    assert (mirror.prefix_source, mirror.continuer, mirror.ks, mirror.gap[0]) == ("teacher", "student", (0, 4), 0.0)
    assert json.loads((tmp_path / "mirror" / "decay.json").read_text())["mirror"] is True


def test_cross_tokenizer_pair_is_refused(monkeypatch, tmp_path):
    one, other = SimpleNamespace(get_vocab=lambda: {"a": 0, "b": 1}), SimpleNamespace(get_vocab=lambda: {"a": 1})
    monkeypatch.setattr("esr.models.pair.load_tokenizer", lambda name, *a: one if name == "tiny-student" else other)
    with pytest.raises(ConfigError, match="decay probe needs a shared vocabulary"):
        run_decay("configs/smoke.yaml", tmp_path, ks=(0, 4), limit=1, max_new_tokens=2, progress=False)
    assert not list(tmp_path.iterdir())
