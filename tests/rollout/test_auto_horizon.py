"""The auto-horizon rule and policy on hand-made profiles (esr/rollout/auto_horizon.py), and its config checks."""

import json

import numpy as np
import pytest
import torch

import esr.analysis.kl_profile as kl_profile_module
from esr.analysis.kl_profile import summarize_profile
from esr.config import ConfigError, load_config
from esr.rollout import make_policy
from esr.rollout.auto_horizon import AutoHorizon, horizon_rule, running_profile

SMOKE = "configs/smoke.yaml"


def test_the_rule_takes_the_first_position_holding_the_share_of_the_mass():
    # M = [4, 3, 2, 1], total 10: C = [0.4, 0.7, 0.9, 1.0]
    assert horizon_rule([4.0, 3.0, 2.0, 1.0], 0.45) == 2
    assert horizon_rule([4.0, 3.0, 2.0, 1.0], 0.40) == 1  # reaching the share exactly counts
    assert horizon_rule([4.0, 3.0, 2.0, 1.0], 0.95) == 4
    assert horizon_rule([0.0, 0.0, 5.0, 5.0], 0.45) == 3


def test_the_rule_clamps_to_n_min_n_max_and_to_half_or_double_the_previous_n():
    mass = np.ones(100)  # uniform: N* = 45 at share 0.45
    assert horizon_rule(mass, 0.45) == 45
    assert horizon_rule(mass, 0.45, n_min=60) == 60
    assert horizon_rule(mass, 0.45, n_max=30) == 30
    assert horizon_rule(mass, 0.45, previous=10) == 20  # at most doubles
    assert horizon_rule(mass, 0.45, previous=200) == 100  # at most halves
    assert horizon_rule(mass, 0.45, previous=91) == 46  # ceil(91 / 2)
    assert horizon_rule(mass, 0.45, previous=40) == 45  # within the limits: the rule's N
    assert horizon_rule(mass, 0.45, n_max=30, previous=100) == 30  # the bounds win over the step limit
    assert horizon_rule(mass, 0.45, n_min=8, previous=2) == 8
    assert horizon_rule(np.zeros(8), 0.45, previous=7) == 7  # no KL at all: keep N
    assert horizon_rule(np.zeros(8), 0.45) is None


def test_the_running_profile_is_an_exponential_average_padded_with_zeros():
    first = running_profile(None, [2.0, 2.0], 0.25)
    np.testing.assert_array_equal(first, [2.0, 2.0])  # the first probe is the profile
    second = running_profile(first, [6.0, 6.0, 4.0], 0.25)
    np.testing.assert_allclose(second, [0.75 * 2 + 0.25 * 6, 0.75 * 2 + 0.25 * 6, 0.25 * 4])
    np.testing.assert_allclose(running_profile(second, [1.0], 1.0), [1.0, 0.0, 0.0])  # weight 1: newest only


def test_the_policy_moves_n_by_at_most_a_doubling_and_its_state_round_trips_exactly():
    cfg = load_config(SMOKE, ["rollout.horizon=auto", "rollout.n=4", "rollout.auto.n_min=2",
                              "rollout.auto.ema=0.3"]).rollout
    policy = make_policy(cfg)
    assert isinstance(policy, AutoHorizon) and policy.plan(0) == 4 and policy.n_max == 32  # None: max_new_tokens
    late = np.r_[np.zeros(29), np.ones(3)]  # all the KL at positions 30-32: N* = 31
    assert [policy.update(late) for _ in range(5)] == [8, 16, 31, 31, 31]
    assert policy.plan(7) == 31 and policy.probes == 5
    policy.update(np.r_[np.ones(3) * 100, np.zeros(29)])  # now the KL sits early: N may at most halve
    assert policy.n == 16
    copy = make_policy(cfg)
    copy.load_state_dict(json.loads(json.dumps(policy.state_dict())))  # through trainer_state.json
    assert copy.n == policy.n and np.array_equal(copy.profile_T, policy.profile_T)
    assert copy.update(late) == policy.update(late) and np.array_equal(copy.profile_T, policy.profile_T)


def test_kl_profile_recommends_n_with_the_same_rule_function():
    assert kl_profile_module.horizon_rule is horizon_rule  # one function, not a copy
    kl = torch.tensor([[1.0, 1.0, 1.0, 5.0], [1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True] * 4, [True, False, False, False], [True, False, False, False]])
    p = summarize_profile({"kl": kl, "student_entropy": kl, "teacher_entropy": kl}, mask, share=0.45, bucket=2)
    assert p.recommended_n == horizon_rule([3.0, 1.0, 1.0, 5.0], 0.45) == 3  # mass: 3/10 < 0.45 <= 5/10
    assert p.recommended_n_position == 4  # means [1, 1, 1, 5]: 3/8 < 0.45 until the last position


@pytest.mark.parametrize(("overrides", "needle"), [
    (["rollout.auto.n_max=64"], "rollout.auto.n_max=64 is larger than rollout.max_new_tokens=32"),
    (["rollout.auto.n_min=20", "rollout.auto.n_max=10"], "rollout.auto.n_min=20 is larger than rollout.auto.n_max=10"),
    (["rollout.n=40"], "rollout.n=40 (auto's starting N) is larger than rollout.max_new_tokens=32"),
    (["teacher.url=http://localhost:1", "loss.kind=sampled"], "rollout.horizon=auto measures the exact per-position"),
])
def test_auto_settings_that_cannot_work_are_config_errors(overrides, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(SMOKE, ["rollout.horizon=auto", *overrides])
