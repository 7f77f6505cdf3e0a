"""EffOPD extrapolation: the line search on a hand-worked quadratic, bit-exact rollback, the optimizer-state
option, the schedule and which weights move."""

import math

import pytest
import torch
from torch import nn

from esr.config import ConfigError, ExtrapolateConfig, load_config
from esr.optim import Extrapolator, extrapolation_params, is_due

ON = ExtrapolateConfig(enabled=True)


class Point(nn.Module):
    def __init__(self, *values: float) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(values, dtype=torch.float64))


def quadratic(model: Point, target: list[float]):
    """f(theta) = ||theta - target||^2, the probe loss, recording every theta it was called at."""
    seen = []

    def probe() -> float:
        seen.append(model.theta.detach().clone().tolist())
        return float(((model.theta.detach() - torch.tensor(target, dtype=torch.float64)) ** 2).sum())

    return probe, seen


def test_line_search_on_a_quadratic_follows_the_hand_worked_trajectory():
    """theta_base = (0, 0); an update moves theta to (1, 0.5); the optimum (6, 3) lies on that direction.

    f(1, .5) = 25 + 6.25 = 31.25
    try 1, alpha = 2:     theta = (1, .5) + 2 (1, .5)        = (3, 1.5)   f = 9 + 2.25 = 11.25   accept
                          alpha = 2 / 3
    try 2, alpha = 2/3:   theta = (3, 1.5) + 2/3 (3, 1.5)    = (5, 2.5)   f = 1 + .25  = 1.25    accept
                          alpha = (2/3) / (5/3) = 0.4
    try 3, alpha = 0.4:   theta = (5, 2.5) + 0.4 (5, 2.5)    = (7, 3.5)   f = 1.25, not lower     roll back
    => theta = (5, 2.5) = theta_base. Every accepted try moved theta by alpha_1 * d = (2, 1).
    """
    model = Point(0.0, 0.0)
    probe, seen = quadratic(model, [6.0, 3.0])
    ex = Extrapolator(extrapolation_params(model, "trainable"), ON, probe)
    with torch.no_grad():
        model.theta.copy_(torch.tensor([1.0, 0.5]))
    event = ex.extrapolate(step=1)

    assert seen == [[1, 0.5], [3, 1.5], [5, 2.5], [7, 3.5]]
    assert event.alphas_tried == pytest.approx([2, 2 / 3, 0.4])
    assert event.alphas_accepted == pytest.approx([2, 2 / 3])
    assert event.scores_tried == pytest.approx([11.25, 1.25, 1.25])
    assert (event.score_before, event.score_after, event.tries) == (31.25, 1.25, 3)
    assert model.theta.tolist() == [5.0, 2.5]
    assert ex.base[0].tolist() == [5.0, 2.5]
    assert ex.alpha == 2.0  # each extrapolation starts again at optim.extrapolate.alpha

    # Next point: no update since (d = 0), so the try changes nothing, is not better, and is rolled back.
    event = ex.extrapolate(step=2)
    assert (event.tries, event.alphas_accepted, model.theta.tolist()) == (1, [], [5.0, 2.5])


def test_overshooting_stops_at_the_first_worse_try_and_carry_alpha_keeps_it():
    """Optimum (4, 2): from (1, .5) try (3, 1.5) f = 1.25 < 11.25 accepted; then (5, 2.5) f = 1.25 not lower."""
    model = Point(0.0, 0.0)
    probe, _ = quadratic(model, [4.0, 2.0])
    cfg = ExtrapolateConfig(enabled=True, carry_alpha=True)
    ex = Extrapolator(extrapolation_params(model, "trainable"), cfg, probe)
    with torch.no_grad():
        model.theta.copy_(torch.tensor([1.0, 0.5]))
    event = ex.extrapolate(step=1)
    assert event.alphas_accepted == [2.0] and event.tries == 2
    assert model.theta.tolist() == [3.0, 1.5]
    assert ex.alpha == pytest.approx(2 / 3)  # carried: the next extrapolation starts where this one stopped


def test_rollback_leaves_weights_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3))
    params = list(model.named_parameters())
    calls = {"n": 0}

    def worse_every_time() -> float:
        calls["n"] += 1
        return float(calls["n"])

    ex = Extrapolator(params, ON, worse_every_time)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # "the optimizer step"
    before = {n: p.detach().clone() for n, p in params}
    event = ex.extrapolate(step=1)
    assert event.tries == 1 and event.alphas_accepted == []
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # bit for bit, not merely close
    for b, (n, _) in zip(ex.base, params, strict=True):
        assert torch.equal(b, before[n])


def test_rollback_after_acceptances_restores_the_best_try_exactly():
    torch.manual_seed(1)
    model = nn.Linear(5, 4)
    scores = iter([3.0, 2.0, 1.5, 1.7])  # before, try 1 (accept), try 2 (accept), try 3 (worse: roll back)
    ex = Extrapolator(list(model.named_parameters()), ON, lambda: next(scores))
    start = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
        expected = [p.detach().clone() for p in model.parameters()]
        for alpha in (2.0, 2.0 / 3.0):  # the same float operations the extrapolator does
            for e, s in zip(expected, start, strict=True):
                e.add_(e - s, alpha=alpha)
    event = ex.extrapolate(step=1)
    assert event.alphas_accepted == [2.0, pytest.approx(2 / 3)] and event.tries == 3
    for p, e in zip(model.parameters(), expected, strict=True):
        assert torch.equal(p, e)


def test_a_non_finite_probe_is_a_failed_try():
    model = Point(0.0)
    scores = iter([1.0, math.nan])
    ex = Extrapolator(extrapolation_params(model, "trainable"), ON, lambda: next(scores))
    with torch.no_grad():
        model.theta.fill_(1.0)
    assert ex.extrapolate(step=1).alphas_accepted == [] and model.theta.tolist() == [1.0]


@pytest.mark.parametrize("option", ["keep", "reset"])
def test_optimizer_state_after_an_accepted_jump(option):
    model = Point(0.0, 0.0)
    probe, _ = quadratic(model, [6.0, 3.0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    ex = Extrapolator(extrapolation_params(model, "trainable"), ExtrapolateConfig(enabled=True, optimizer_state=option),
                      probe, optimizer)
    model.theta.grad = torch.tensor([-1.0, -0.5], dtype=torch.float64)
    optimizer.step()
    moment = optimizer.state[model.theta]["exp_avg"].clone()
    ex.extrapolate(step=1)
    if option == "keep":
        assert torch.equal(optimizer.state[model.theta]["exp_avg"], moment)
    else:
        assert model.theta not in optimizer.state
        model.theta.grad = torch.tensor([1.0, 1.0], dtype=torch.float64)
        optimizer.step()  # AdamW starts a fresh state
        assert int(optimizer.state[model.theta]["step"]) == 1


def test_schedule():
    assert [s for s in range(1, 40) if is_due(s, ON)] == [1, 2, 4, 8, 16, 32]
    every = ExtrapolateConfig(enabled=True, schedule="every", every=7)
    assert [s for s in range(1, 30) if is_due(s, every)] == [7, 14, 21, 28]
    assert not any(is_due(s, ExtrapolateConfig()) for s in range(1, 10))


def test_which_weights_move(needs_smollm2_package):
    from esr.models import apply_lora, load_model

    full, _ = load_model("tiny-student")
    for p in full.parameters():
        p.requires_grad_(True)
    names = [n for n, _ in extrapolation_params(full, "attention-mlp")]
    assert names and all(("self_attn" in n or "mlp" in n) for n in names)
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in names)
    assert len(extrapolation_params(full, "trainable")) > len(names)

    lora = apply_lora(load_model("tiny-student")[0], r=4, alpha=8, dropout=0.0, targets="all-linear")
    names = [n for n, _ in extrapolation_params(lora, "attention-mlp")]
    assert names and all("lora_" in n for n in names)
    assert names == [n for n, p in lora.named_parameters() if p.requires_grad]


def test_state_dict_round_trip():
    model = Point(1.0, 2.0)
    ex = Extrapolator(extrapolation_params(model, "trainable"), ExtrapolateConfig(enabled=True, carry_alpha=True),
                      lambda: 0.0)
    tensors, state = ex.state_dict()
    other = Extrapolator(extrapolation_params(Point(0.0, 0.0), "trainable"), ON, lambda: 0.0)
    other.load_state_dict(tensors, {"alpha": 0.4})
    assert other.base[0].tolist() == [1.0, 2.0] and other.alpha == 0.4
    with pytest.raises(KeyError, match="lacks"):
        other.load_state_dict({}, state)


def test_config_checks():
    cfg = load_config(None, ["optim.extrapolate.enabled=true", "optim.extrapolate.schedule=every"])
    assert cfg.optim.extrapolate.schedule == "every" and cfg.optim.extrapolate.alpha == 2.0
    with pytest.raises(ConfigError, match="Did you mean 'optim.extrapolate.alpha'"):
        load_config(None, ["optim.extrapolate.alpah=1"])
    with pytest.raises(ConfigError, match="alpha must be a finite number > 0"):
        load_config(None, ["optim.extrapolate.alpha=0"])
    with pytest.raises(ConfigError, match="powers-of-two"):
        load_config(None, ["optim.extrapolate.schedule=pow2"])
