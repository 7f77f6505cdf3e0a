from esr.config import load_config
from esr.rollout.policies import EarlyStop, FullHorizon, Progressive, RatioHorizon, make_policy


def test_fixed_horizons():
    assert [EarlyStop(100).plan(k) for k in (0, 7, 199)] == [100, 100, 100]
    assert FullHorizon(512).plan(3) == 512
    assert RatioHorizon(0.1, 512).plan(0) == 51


def test_progressive_grows_then_caps():
    p = Progressive(h0=50, dh=50, every=10, T=200)
    assert [p.plan(k) for k in (0, 9, 10, 19, 20, 30, 40, 1000)] == [50, 50, 100, 100, 150, 200, 200, 200]


def test_make_policy_reads_config():
    assert make_policy(load_config(None, ["rollout.horizon=esr", "rollout.n=64"]).rollout) == EarlyStop(64)
    cfg = load_config(None, ["rollout.horizon=ratio", "rollout.rho=0.25"])
    assert make_policy(cfg.rollout) == RatioHorizon(0.25, 512)
