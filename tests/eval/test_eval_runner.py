"""The evaluation runner, tasks, `esr eval` and evaluation during training, on tiny models and real task data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esr.cli import main
from esr.config import load_config
from esr.data.sources import DataError
from esr.eval.runner import evaluate, summarize
from esr.eval.targets import eval_targets
from esr.eval.tasks import HumanEvalTask, MathTask, make_task, program_code
from esr.models import load_model
from esr.train import train

SMOKE = "configs/smoke.yaml"
MATH500 = Path(__file__).resolve().parents[3] / "shared" / "data" / "math500" / "test.jsonl"


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-student")


def test_evaluate_writes_samples_and_summary(tiny, tmp_path):
    model, tok = tiny
    result = evaluate(model, tok, make_task("gsm_symbolic"), n=2, temperature=0.7, max_new_tokens=12, limit=3,
                      batch_size=4, out_dir=tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == len(result.samples) == 6 and [r["sample"] for r in rows[:2]] == [0, 1]
    for r in rows:
        assert {"prompt", "response", "answer", "correct", "tokens", "cut", "gold", "relaxed_correct"} <= set(r)
        assert 1 <= r["tokens"] <= 12 and r["prompt"].startswith("<|im_start|>")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["n_problems"] == 3 and summary["n_samples"] == 6 and summary["tokens_per_second"] > 0
    for key in ("accuracy", "pass@1", "pass@2", "maj@2", "cut_share", "multi_box_share", "relaxed_accuracy"):
        assert 0 <= summary[key] <= 1, key
    assert summary["pass@1"] <= summary["pass@2"] and 1 <= summary["length_p50"] <= 12


def test_greedy_is_deterministic_and_rejects_n_above_one(tiny):
    model, tok = tiny
    task = make_task("gsm_symbolic")
    a = evaluate(model, tok, task, max_new_tokens=8, limit=2, progress=False)
    b = evaluate(model, tok, task, max_new_tokens=8, limit=2, progress=False, seed=99)
    assert [r["response"] for r in a.samples] == [r["response"] for r in b.samples]
    with pytest.raises(ValueError, match="greedy"):
        evaluate(model, tok, task, n=3, temperature=0.0, limit=1, progress=False)


def test_summarize_counts_by_hand():
    task = MathTask("t", None)  # only .name and .kind are read
    recs = [
        # problem a: 1 of 2 correct, both answers "2" and "\frac{4}{2}" (equivalent, the majority is right)
        {"id": "a", "correct": True, "answer": "2", "gold": "2", "tokens": 10, "cut": False, "boxes": 1,
         "repeated_4gram_share": 0.0, "first_box_correct": True, "relaxed_correct": True},
        {"id": "a", "correct": False, "answer": None, "gold": "2", "tokens": 30, "cut": True, "boxes": 3,
         "repeated_4gram_share": 0.5, "first_box_correct": False, "relaxed_correct": True},
        # problem b: 0 of 2 correct
        {"id": "b", "correct": False, "answer": "7", "gold": "5", "tokens": 20, "cut": False, "boxes": 1,
         "repeated_4gram_share": 0.0, "first_box_correct": False, "relaxed_correct": False},
        {"id": "b", "correct": False, "answer": "7", "gold": "5", "tokens": 20, "cut": False, "boxes": 0,
         "repeated_4gram_share": 0.0, "first_box_correct": False, "relaxed_correct": False},
    ]
    s = summarize(task, recs, 2)
    assert s["accuracy"] == 0.25 and s["pass@1"] == 0.25 and s["pass@2"] == 0.5  # a: 1 - C(1,2)/C(2,2) = 1
    assert s["maj@2"] == 0.5 and s["cut_share"] == 0.25 and s["multi_box_share"] == 0.25
    assert s["relaxed_accuracy"] == 0.5 and s["first_box_accuracy"] == 0.25


def test_math500_task_reads_gold_answers():
    if not MATH500.is_file():
        pytest.skip(f"{MATH500} not present")
    task = make_task("math500", path=str(MATH500))
    items = task.load(5)
    assert len(items) == 5 and all(isinstance(it.reference, str) and it.reference for it in items)
    solution = "... so the result is $\\boxed{" + items[0].reference + "}$."
    assert task.score(items[0], solution).correct and not task.score(items[0], "\\boxed{12345678}").correct


def test_humaneval_canonical_solutions_pass_and_broken_ones_fail():
    task = HumanEvalTask(timeout_s=10)
    items = task.load(6)
    assert [it.id for it in items[:2]] == ["HumanEval/0", "HumanEval/1"]
    for it in items:
        assert task.score(it, it.reference["canonical_solution"]).correct, it.id  # a base model's continuation
        fenced = f"Here you go:\n```python\n{it.reference['prompt']}{it.reference['canonical_solution']}```"
        assert task.score(it, fenced).correct, it.id  # a chat model's whole function in a block
        assert not task.score(it, "    return None\n").correct, it.id


def test_program_code_prefers_a_block_defining_the_entry_point():
    prompt = "from typing import List\n\ndef f(x: List[int]) -> int:\n    \"\"\"doc\"\"\"\n"
    code = program_code(prompt, "```python\ndef helper():\n    pass\n```\n```python\ndef f(x):\n    return 1\n```", "f")
    assert code.startswith("from typing import List") and "return 1" in code and "helper" not in code


def test_unknown_task_and_missing_path_are_clear():
    with pytest.raises(DataError, match="Did you mean 'humaneval'"):
        make_task("humaneva")
    with pytest.raises(DataError, match="--path"):
        make_task("gsm8k")


def test_cli_eval_and_checkpoint_comparison(tmp_path, capsys):
    out = tmp_path / "e"
    args = ["eval", "tiny-student", "--task", "gsm_symbolic", "--limit", "2", "--max-new-tokens", "6", "--out",
            str(out), "--no-progress"]
    assert main(args) == 0
    assert (out / "summary.json").is_file() and "accuracy" in capsys.readouterr().out

    run = train(load_config(SMOKE, ["train.steps=2", "train.checkpoint_every=1"]), tmp_path / "run", progress=False)
    assert [label for label, _ in eval_targets(str(run.run_dir))] == ["base", "step-000001", "step-000002"]
    assert main(["eval", str(run.run_dir), "--task", "gsm_symbolic", "--limit", "1", "--max-new-tokens", "4",
                 "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "base" in table and "step-000002" in table
    assert (run.run_dir / "eval" / "gsm_symbolic" / "step-000002" / "summary.json").is_file()


def test_evaluation_during_training_keeps_history_and_best(tmp_path):
    cfg = load_config(SMOKE, ["train.steps=3", "train.checkpoint_every=10", "eval.every=2", "eval.limit=2",
                              "eval.max_new_tokens=6"])
    run = train(cfg, tmp_path / "r", progress=False)
    history = [json.loads(line) for line in (run.run_dir / "eval" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [2]
    assert history[0]["checkpoint"].endswith("step-000002") and Path(history[0]["checkpoint"]).is_dir()
    best = json.loads((run.run_dir / "eval" / "best.json").read_text())
    assert best["step"] == 2 and best["metric"] == "accuracy"



def test_resume_forgets_evaluations_of_redone_steps(tmp_path):
    from esr.train.evaluation import PeriodicEval

    evals = PeriodicEval(load_config(SMOKE, ["eval.every=2"]), tmp_path)
    evals.folder.mkdir(parents=True)
    rows = [{"step": 2, "checkpoint": "c2", "accuracy": 0.25}, {"step": 4, "checkpoint": "c4", "accuracy": 0.5}]
    evals.history_path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "accur')  # torn line
    assert [r["step"] for r in evals.history()] == [2, 4]
    evals.truncate_after(3)
    assert [r["step"] for r in evals.history()] == [2]
    assert json.loads((evals.folder / "best.json").read_text())["checkpoint"] == "c2"
    assert evals.due(4) and not evals.due(3)
