"""Several teachers and a data mix (``data.mix``): config, the rows each step draws, routing every row to its own
teacher, per-source metrics and bit-exact resume, on the tiny smoke models (``tiny-teacher`` shares the student's
tokenizer, ``tiny-teacher-qwen`` has another: a same- and a cross-tokenizer teacher in one run)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from crash_resume import crash_and_resume, same_adapter
from rich.console import Console

from esr.config import ConfigError, from_dict, load_config, to_dict
from esr.data.mix import mix_batch_indices
from esr.train import train
from esr.train.progress import summary_table
from esr.train.run_step import _loss_pass, _sample, run_mix_step, take_rows
from esr.train.scores import Selection
from esr.train.session import build_session

SMOKE = "configs/smoke.yaml"
MIX = ("data.mix=[{name: same, source: gsm_symbolic, size: 20, weight: 3}, "
       "{name: cross, source: gsm_symbolic, size: 30, weight: 1, teacher: {name: tiny-teacher-qwen}}]")
SMALL = [MIX, "loss.cross_tokenizer=aligned-exact", "rollout.n=8", "rollout.max_new_tokens=16"]


# ----------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(("override", "message"), [
    ("data.mix=[{source: gsm_symbolic}, {pathh: x.jsonl}]",
     r"data\.mix\[1\]\.pathh'\. Did you mean 'data\.mix\[1\]\.path'"),
    ("data.mix=[{teacher: {nme: tiny-teacher}}]", r"data\.mix\[0\]\.teacher\.nme'\. Did you mean"),
    ("data.mix=[{weight: 0}]", r"data\.mix\[0\]\.weight must be a finite number > 0, got 0"),
    ("data.mix=[{}, {}]", "two items named 'gsm_symbolic'"),
    ("data.mix={source: gsm8k}", "data.mix must be a list of mappings"),
])
def test_a_wrong_mix_item_is_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE, [override])


def test_mix_refuses_a_single_source_and_score_selection_and_round_trips():
    with pytest.raises(ConfigError, match="drop data.path"):
        load_config(SMOKE, [MIX, "data.path=x.jsonl"])
    with pytest.raises(ConfigError, match="loss.select=top-kl-n .* data.mix"):
        load_config(SMOKE, [MIX, "loss.select=top-kl-n", "loss.select_n=4"])
    cfg = load_config(SMOKE, [MIX])
    assert cfg.data.mix[1].teacher.name == "tiny-teacher-qwen" and cfg.data.mix[0].teacher is None
    assert from_dict(to_dict(cfg)) == cfg  # config.yaml (what resume reads) holds the mix as written


# ----------------------------------------------------------------------------------------------------------------
# Order


def test_each_batch_holds_the_weights_proportions_and_is_a_pure_function_of_the_step():
    sizes, weights = [5, 40], (0.75, 0.25)
    batches = [mix_batch_indices(sizes, weights, 4, step, seed=3) for step in range(50)]
    for batch in batches:  # 3 rows of source 0 (indices < 5) and 1 of source 1 in every batch of 4
        assert Counter(i < 5 for i in batch) == {True: 3, False: 1}
    assert mix_batch_indices(sizes, weights, 4, 37, seed=3) == batches[37]  # asked again, alone: the same rows
    seen = [i for b in batches[:10] for i in b if i >= 5]  # source 1 walks a permutation: no repeat in an epoch
    assert len(set(seen)) == len(seen) == 10
    skewed = Counter(i < 5 for step in range(30) for i in mix_batch_indices(sizes, (0.9, 0.1), 3, step, seed=0))
    assert skewed == {True: 81, False: 9}
    assert mix_batch_indices(sizes, weights, 4, 0, seed=4) != batches[0] or mix_batch_indices(
        sizes, weights, 4, 1, seed=4) != batches[1]  # the seed picks the permutations


# ----------------------------------------------------------------------------------------------------------------
# Routing: each row scored by its own teacher


@pytest.fixture(scope="module")
def sessions():
    """The mix session, and one single-teacher session per source on that source's data alone."""
    mix_cfg = load_config(SMOKE, [*SMALL, "train.batch_size=4"])
    one = ["loss.cross_tokenizer=aligned-exact", "rollout.n=8", "rollout.max_new_tokens=16"]
    same_cfg = load_config(SMOKE, [*one, "data.size=20"])
    cross_cfg = load_config(SMOKE, [*one, "data.size=30", "teacher.name=tiny-teacher-qwen"])
    return (mix_cfg, build_session(mix_cfg)), (same_cfg, build_session(same_cfg)), (cross_cfg, build_session(cross_cfg))


def _kl_alone(s, cfg, rollouts, prompt_index):
    """Mean KL of ``rollouts`` over every token ``s``'s (single) teacher can score."""
    batch = s.scorer.read(rollouts, prompt_index)
    select = batch.valid_B_R & rollouts.response_mask_B_R
    _, kl_sum, _, _ = _loss_pass(s, cfg, batch, Selection(select, None, 1, None), None)
    s.student.zero_grad(set_to_none=True)
    return kl_sum / int(select.sum())


def test_each_source_is_scored_by_its_own_teacher(sessions):
    (mix_cfg, s), (same_cfg, s_same), (cross_cfg, s_cross) = sessions
    sampled = _sample(s, mix_cfg, 0, s.policy.plan(0))[:4]  # no teacher-sampled rows with a mix
    _, prompt_index, rollouts, _ = sampled
    groups = dict(s.route.groups(prompt_index))
    assert [len(groups[j]) for j in (0, 1)] == [3, 1]  # weights 3:1
    offset = s.route.mix.offsets[1]
    same_rows = take_rows(rollouts, groups[0])
    cross_rows = take_rows(rollouts, groups[1])
    expected = {
        "same": _kl_alone(s_same, same_cfg, same_rows, [prompt_index[b] for b in groups[0]]),
        "cross": _kl_alone(s_cross, cross_cfg, cross_rows, [prompt_index[b] - offset for b in groups[1]]),
    }
    # The other teacher gives another KL on the same rows: the routing is what the figures show.
    other = _kl_alone(s_cross, cross_cfg, same_rows, [prompt_index[b] for b in groups[0]])
    assert abs(other - expected["same"]) > 1e-4 * expected["same"]
    m = run_mix_step(s, mix_cfg, 0, s.policy.plan(0), sampled)
    for name in ("same", "cross"):
        assert m.by_source[name]["kl"] == pytest.approx(expected[name], rel=1e-5), name
    assert [m.by_source[n]["rows"] for n in ("same", "cross")] == [3, 1]
    n = sum(m.by_source[n]["tokens_scored"] for n in ("same", "cross"))
    assert n == m.tokens_scored and m.kl == pytest.approx(
        sum(m.by_source[k]["kl"] * m.by_source[k]["tokens_scored"] for k in ("same", "cross")) / n, rel=1e-6)
    assert m.loss == pytest.approx(m.kl, rel=1e-5)  # reverse KL: the loss is the whole batch's token mean


def test_a_batch_from_one_source_does_not_run_the_other_teacher(sessions, monkeypatch):
    (mix_cfg, s), _, _ = sessions
    calls = Counter()
    for name, scorer in zip(s.route.mix.names, s.route.scorers, strict=True):
        for method in ("read", "targets"):
            real = getattr(scorer, method)
            monkeypatch.setattr(scorer, method, lambda *a, _real=real, _key=(name, method), **k: (
                calls.update([_key]), _real(*a, **k))[1])
    cfg = load_config(SMOKE, [*SMALL, "train.batch_size=1"])  # step 0's one row: the first source (weight 3)
    m = run_mix_step(s, cfg, 0, s.policy.plan(0), _sample(s, cfg, 0, s.policy.plan(0))[:4])
    assert calls == {("same", "read"): 1, ("same", "targets"): 1}
    assert list(m.by_source) == ["same"]
    s.student.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------------
# A whole run: run.json, metrics.jsonl, resume


def test_a_mix_run_logs_each_source_and_resumes_bit_exactly(tmp_path, monkeypatch):
    overrides = [*SMALL, "train.steps=3", "train.checkpoint_every=2", "train.batch_size=2", "train.micro_batch_size=1"]
    whole = train(load_config(SMOKE, overrides), tmp_path / "whole", progress=False)
    info = json.loads((tmp_path / "whole" / "run.json").read_text())
    mix = info["mix"]
    assert mix["teachers"] == ["tiny-teacher", "tiny-teacher-qwen"]
    assert {k: (v["teacher"], v["prompts"]) for k, v in mix["sources"].items()} == {
        "same": ("tiny-teacher", 20), "cross": ("tiny-teacher-qwen", 30)}
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(r["by_source"]) for r in rows] == [["same"], ["cross", "same"], ["same"]]  # a, a | b, a | a, a
    console = Console(record=True, width=200)
    console.print(summary_table(rows, tmp_path))
    assert "mean KL of cross, first -> last 3 steps" in console.export_text()

    resumed = crash_and_resume(monkeypatch, load_config(SMOKE, overrides), tmp_path / "crashed")  # inside step 3
    assert _stable(resumed.metrics) == _stable(whole.metrics)
    assert same_adapter(whole, resumed)


def _stable(rows):
    """Metrics without wall-clock figures."""
    out = []
    for r in rows:
        r = {k: v for k, v in r.items() if not k.startswith("seconds_") and k != "peak_mem_gb"}
        r["by_source"] = {n: {k: v for k, v in m.items() if not k.startswith("seconds")}
                          for n, m in r["by_source"].items()}
        out.append(r)
    return out
