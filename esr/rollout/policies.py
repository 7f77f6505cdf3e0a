"""Horizon policies: how many new tokens the student may generate at each training step.

Each policy is a pure function of the step, so a resumed run plans exactly what an uninterrupted one would.

    FullHorizon(T)                 H_k = T                                   (full-rollout OPD)
    EarlyStop(N)                   H_k = N                                   (ESR, N ~ 100)
    Progressive(h0, dh, every, T)  H_k = min(T, h0 + dh * floor(k / every))  (POPD)
    RatioHorizon(rho, T)           H_k = max(1, round(rho * T))              (TOPD)
    AutoHorizon(...)               H_k = N from probes of the KL profile     (rollout.horizon=auto)

AutoHorizon is the one stateful policy: its state is checkpointed (esr/rollout/auto_horizon.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from esr.config import RolloutConfig
from esr.rollout.auto_horizon import AutoHorizon


class HorizonPolicy(Protocol):
    def plan(self, step: int) -> int:
        """Max new tokens for 0-based training step ``step``."""
        ...


@dataclass(frozen=True)
class FullHorizon:
    T: int

    def plan(self, step: int) -> int:
        return self.T


@dataclass(frozen=True)
class EarlyStop:
    N: int

    def plan(self, step: int) -> int:
        return self.N


@dataclass(frozen=True)
class Progressive:
    h0: int
    dh: int
    every: int
    T: int

    def plan(self, step: int) -> int:
        return min(self.T, self.h0 + self.dh * (step // self.every))


@dataclass(frozen=True)
class RatioHorizon:
    rho: float
    T: int

    def plan(self, step: int) -> int:
        return max(1, round(self.rho * self.T))


def make_policy(cfg: RolloutConfig) -> HorizonPolicy:
    """The policy named by ``rollout.horizon``."""
    if cfg.horizon == "full":
        return FullHorizon(cfg.max_new_tokens)
    if cfg.horizon == "esr":
        return EarlyStop(cfg.n)
    if cfg.horizon == "auto":
        a = cfg.auto
        return AutoHorizon(cfg.n, a.share, a.n_min, a.n_max or cfg.max_new_tokens, a.ema)
    if cfg.horizon == "progressive":
        return Progressive(cfg.h0, cfg.dh, cfg.every, cfg.max_new_tokens)
    return RatioHorizon(cfg.rho, cfg.max_new_tokens)
