"""Student rollouts: horizon policies and the sampler."""

from esr.rollout.engine import ENGINES, Sampler, make_sampler
from esr.rollout.policies import EarlyStop, FullHorizon, HorizonPolicy, Progressive, RatioHorizon, make_policy
from esr.rollout.sampler import HFSampler, build_rollouts

__all__ = [
    "ENGINES", "EarlyStop", "FullHorizon", "HFSampler", "HorizonPolicy", "Progressive", "RatioHorizon", "Sampler",
    "build_rollouts", "make_policy", "make_sampler",
]
