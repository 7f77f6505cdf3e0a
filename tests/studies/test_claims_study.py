"""The claims study driver (studies/claims.py) on tiny random models: every arm trains, is evaluated and analysed,
the summary reads back what the runs wrote, and a second invocation resumes instead of redoing anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

STUDIES = Path(__file__).resolve().parents[2] / "studies"

pytestmark = pytest.mark.slow



def _gsm8k(path: Path, rows: int, offset: int) -> Path:
    lines = [json.dumps({"question": f"Tom has {a} apples and buys {a + 3} more. How many apples does he have?",
                         "answer": f"{a} + {a + 3} = <<{a}+{a + 3}={2 * a + 3}>>{2 * a + 3}\n#### {2 * a + 3}"})
             for a in range(offset, offset + rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def study(needs_smollm2_package, script, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    argv = ["--pair", "tiny", "--steps", "2", "--batch", "2", "--n", "8", "--T", "16", "--eval-every", "1",
            "--eval-limit", "2", "--eval-tokens", "8", "--eval-batch", "2", "--cascade-rollouts", "2",
            "--arms", "esr-8", "full-16", "esr-8-effopd", "--out", str(tmp / "runs"), "--results", str(tmp / "res"),
            "--train-data", str(_gsm8k(tmp / "train.jsonl", 40, 1)),
            "--test-data", str(_gsm8k(tmp / "test.jsonl", 4, 100)), "--no-progress", "--modes-now"]
    claims = script(STUDIES / "claims.py")
    return claims, argv, tmp, claims.main(argv)


def test_every_arm_is_trained_evaluated_and_analysed(study):
    _, _, tmp, summary = study
    assert list(summary["arms"]) == ["esr-8", "full-16", "esr-8-effopd"]
    esr, full = summary["arms"]["esr-8"], summary["arms"]["full-16"]
    assert esr["steps"] == full["steps"] == 2
    assert esr["horizon"] == [8, 8] and full["horizon"] == [16, 16]
    assert [e["step"] for e in esr["evals"]] == [0, 1, 2]  # step 0 is the base student's evaluation
    assert esr["evals"][0]["accuracy"] == summary["base_eval"]["accuracy"]
    assert esr["cascade"]["n"] == full["cascade"]["n"] == 8  # one window for every arm
    assert summary["arms"]["esr-8-effopd"]["seconds_per_step"]["extrapolate"] > 0
    assert esr["seconds_per_step"]["extrapolate"] == 0
    assert {r["name"] for r in summary["modes"]["rows"]} >= {"base student", "teacher", "esr-8/step-000002"}
    for suffix in ("json", "md", "png"):
        assert (tmp / "res" / f"tiny.{suffix}").stat().st_size > 0
    md = (tmp / "res" / "tiny.md").read_text()
    assert "| esr-8 |" in md and "| full-16 |" in md and "Cascade" in md
    jumps = summary["arms"]["esr-8-effopd"]["extrapolation"]
    assert [e["step"] for e in jumps] == [1, 2] and "EffOPD extrapolation" in md and "| esr-8-effopd | 2 |" in md


def test_a_second_run_resumes_without_redoing_anything(study):
    claims, argv, tmp, summary = study
    stamps = {p: p.stat().st_mtime_ns for p in (tmp / "runs").rglob("*") if p.is_file() and "study.json" not in p.name}
    again = claims.main(argv)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["arms"]["esr-8"]["kl"] == summary["arms"]["esr-8"]["kl"]


def test_a_named_variant_writes_its_own_summary_and_leaves_the_pairs_alone(study):
    claims, argv, tmp, _ = study
    stamp = (tmp / "res" / "tiny.md").stat().st_mtime_ns
    claims.main([*argv, "--name", "tiny-variant"])  # same folder (--out): every arm is done, nothing retrains
    assert "| esr-8 |" in (tmp / "res" / "tiny-variant.md").read_text()
    assert (tmp / "res" / "tiny.md").stat().st_mtime_ns == stamp


def test_an_arm_run_later_joins_the_summary_and_the_modes_analysis(study):
    """Arms may be run a few at a time (across sessions): the summary covers every trained arm of the pair, and
    the modes analysis runs again so that it covers them all, not only the last invocation's."""
    claims, argv, tmp, _ = study
    i = argv.index("--arms")
    later = claims.main([*argv[:i], "--arms", "esr-4", *argv[i + 4 :]])
    assert list(later["arms"]) == ["esr-8", "esr-4", "full-16", "esr-8-effopd"]  # the pair's order
    rows = {r["name"].split("/")[0] for r in later["modes"]["rows"]}
    assert rows >= {"esr-8", "esr-4", "full-16", "esr-8-effopd"}
    study_json = json.loads((tmp / "runs" / "study.json").read_text())
    assert study_json["ran"] == ["esr-4"] and "popd" in study_json["arms"]


def test_an_unknown_arm_is_named_with_the_arms_there_are(study, capsys):
    claims, argv, _, _ = study
    with pytest.raises(SystemExit):
        i = argv.index("--arms")
        claims.main([*argv[:i], "--arms", "esr-9", *argv[i + 4 :]])
    assert "esr-9" in capsys.readouterr().err


def test_a_longer_cap_regenerates_only_the_answers_the_first_cap_cut(study, script, tmp_path):
    """studies/longer_cap.py: an answer that ended before the old cap is kept as it is (here one marked so by hand,
    with a text no model wrote), every cut one is generated again under the new cap, and the summary shows both."""
    _, _, tmp, _ = study
    runs = tmp_path / "runs"
    shutil.copytree(tmp / "runs", runs)
    base = runs / "base-eval" / "samples.jsonl"
    rows = [json.loads(line) for line in base.read_text().splitlines()]
    assert all(r["cut"] and r["tokens"] == 8 for r in rows)  # random models run to the 8-token cap
    rows[0].update(cut=False, response="kept as it was", tokens=5)
    base.write_text("".join(json.dumps(r) + "\n" for r in rows))

    longer = script(STUDIES / "longer_cap.py")
    result = longer.main([str(runs), "--cap", "16", "--batch", "2", "--no-progress"])
    assert set(result) == {"base student", "esr-8/step-000002", "esr-4/step-000002", "full-16/step-000002",
                           "esr-8-effopd/step-000002"}
    assert result["base student"]["regenerated"] == len(rows) - 1
    extended = [json.loads(line) for line in (runs / "base-eval" / "cap-16" / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in extended] == [r["id"] for r in rows]
    assert extended[0]["response"] == "kept as it was"
    assert all(r["tokens"] > 8 for r in extended[1:])  # regenerated past the old cap
    assert all(s["max_new_tokens"] == 16 and s["previous_max_new_tokens"] == 8 for s in result.values())

    stamp = (runs / "base-eval" / "cap-16" / "summary.json").stat().st_mtime_ns
    longer.main([str(runs), "--cap", "16", "--no-progress"])  # finished ones are skipped
    assert (runs / "base-eval" / "cap-16" / "summary.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="already ran with a cap of 8"):
        longer.extend(runs / "base-eval", "unused", None, 8)

    summary = script(STUDIES / "claims_summary.py")
    md = summary.markdown(summary.summarize_pair(runs, ["esr-8", "full-16"], "tiny"))
    assert "| base student | 8 |" in md and "| esr-8/step-000002 | 8 |" in md and "longer token cap" in md


def test_the_tables_are_spliced_between_their_markers_and_a_page_without_them_is_refused(script, tmp_path):
    summary = script(STUDIES / "claims_summary.py")
    page = tmp_path / "RESULTS.md"
    page.write_text("intro\n<!-- claims_summary tiny -->\nold table\n<!-- /claims_summary tiny -->\noutro\n")
    summary.splice(page, "tiny", "# Claims study, pair `tiny`\n\n| a | b |\n|---|---|\n")
    summary.splice(page, "tiny", "# Claims study, pair `tiny`\n\n| a | c |\n|---|---|\n")  # again: same block
    assert page.read_text() == ("intro\n<!-- claims_summary tiny -->\n\n| a | c |\n|---|---|\n\n"
                                "<!-- /claims_summary tiny -->\noutro\n")
    with pytest.raises(SystemExit, match="claims_summary other"):
        summary.splice(page, "other", "# t\n")
    assert "| a | c |" in page.read_text()  # a refused splice changes nothing


def test_answer_style_counts_teacher_openings_on_the_same_problem_and_answers_that_compute(script, tmp_path):
    summary = script(STUDIES / "claims_summary.py")

    def samples(name, responses):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"id": i, "sample": 0, "response": r}) + "\n"
                                for i, r in enumerate(responses)))
        return path

    teacher = samples("teacher", ["To determine the total, 2 + 3 = 5", "To solve this, 4 * 2 = 8", "We know x"])
    student = samples("student", ["To determine the  total we plan", "To determine how much: 4 * 2 = 8", "We know x"])
    assert summary.answer_style(student, teacher) == {"opens_like_teacher": 2 / 3, "with_equals": 1 / 3}
    assert summary.answer_style(student, tmp_path / "none.jsonl")["opens_like_teacher"] is None
    assert summary.answer_style(tmp_path / "none.jsonl", teacher) == {"opens_like_teacher": None, "with_equals": None}


def test_aligned_by_kind_splits_tokens_into_math_and_words(script, needs_smollm2_package):
    kinds = script(STUDIES / "aligned_by_kind.py")
    from esr.models import load_tokenizer

    tok = load_tokenizer("tiny-student")
    result = kinds.aligned_by_kind(["So 12 + 3 = 15 apples.", "No working here."], tok, tok)
    assert result["math"][0] == result["words"][0] == 1.0  # one tokenizer cuts every token the same way
    assert result["math"][1] >= 5 and result["words"][1] >= 5


def test_math500_evaluates_the_chosen_levels_resumes_and_splices(study, script, tmp_path):
    """studies/math500.py: only the rows of the asked levels are evaluated (the first --limit of them), for the base
    student and each arm's last checkpoint; a second call reuses them; the table lands between its markers."""
    _, _, tmp, _ = study
    data = tmp_path / "math500.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i), "level": 1 + i % 3,
                                        "unique_id": f"p{i}"}) + "\n" for i in range(9)))
    page = tmp_path / "RESULTS.md"
    begin, end = "<!-- claims_summary runs-math500 -->", "<!-- /claims_summary runs-math500 -->"
    page.write_text(f"before\n{begin}\nSTALE TABLE\n{end}\nafter\n")
    math500 = script(STUDIES / "math500.py")
    argv = [str(tmp / "runs"), "--arms", "esr-8", "full-16", "--levels", "1", "2", "--limit", "4",
            "--max-new-tokens", "4", "--batch", "2", "--data", str(data), "--into", str(page), "--no-progress"]
    results = math500.main(argv)
    out = tmp / "runs" / "math500-l12"
    chosen = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    assert [r["level"] for r in chosen] == [1, 2, 1, 2, 1, 2]  # level 3 rows left out, file order kept
    assert list(results) == ["base student", "esr-8/step-000002", "full-16/step-000002"]
    assert all(s["n_problems"] == 4 and s["max_new_tokens"] == 4 for s in results.values())
    samples = [json.loads(line) for line in (out / "esr-8_step-000002" / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in samples] == [f"problems.jsonl:{i}" for i in range(1, 5)]
    stamp = (out / "base-student" / "summary.json").stat().st_mtime_ns
    math500.main(argv)
    assert (out / "base-student" / "summary.json").stat().st_mtime_ns == stamp
    text = page.read_text()
    assert "STALE" not in text and "| esr-8/step-000002 |" in text and "The first 4 of the 6 problems" in text
    assert text.startswith("before\n") and text.endswith("after\n")
    with pytest.raises(SystemExit, match="no row has a level in"):
        math500.main([*argv[:3], "--levels", "7", "--data", str(data), "--no-progress"])
