"""Student rollouts: horizon policies and the sampler."""

from esr.rollout.policies import EarlyStop, FullHorizon, HorizonPolicy, Progressive, RatioHorizon, make_policy
from esr.rollout.sampler import HFSampler, Sampler, build_rollouts

__all__ = [
    "EarlyStop", "FullHorizon", "HFSampler", "HorizonPolicy", "Progressive", "RatioHorizon", "Sampler",
    "build_rollouts", "make_policy",
]
