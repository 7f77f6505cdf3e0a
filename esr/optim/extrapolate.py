"""EffOPD: extrapolate the weights along their recent update direction (``optim.extrapolate``).

OPD's updates are low-rank and their direction settles early, so after the optimizer step at scheduled steps
(powers of two by default: 1, 2, 4, 8, ...) the weights jump ahead along the update made since the previous
extrapolation point, as long as a held-out probe says the jump helps:

    d      = theta - theta_base                    (theta_base: the weights at the previous point; theta_0 at first)
    try k:   theta_k = theta_{k-1} + alpha_k * (theta_{k-1} - theta_base)         alpha_1 = optim.extrapolate.alpha
             accept if  probe(theta_k) < probe(best) - min_improvement;  then alpha_{k+1} = alpha_k / (1 + alpha_k)
             else roll back to the best theta (bit for bit) and stop;   at most max_tries tries
    theta_base <- the best theta

Since theta_k - theta_base = (1 + alpha_k) (theta_{k-1} - theta_base), the shrinking rule makes every accepted try
move the weights by the same amount, alpha_1 * d: the tries are a line search along d with a constant stride
(alpha = 2: theta + 2d, + 4d, + 6d, ...). ``probe`` is a loss (lower is better): mean reverse KL on fixed held-out
rollouts, or minus an evaluation metric (``esr.optim.probe``).

Only the weights named by ``optim.extrapolate.params`` move (the decoder's linear layers: LoRA adapters, or the
attention and MLP matrices in full fine-tuning), so esr keeps one extra copy of those (theta_base) between
extrapolations; during one, the best weights are backed up in host memory. With LoRA the rule acts on A and B
themselves, so the product BA moves along a curve, not a line. AdamW's moments are kept after a jump (the authors'
choice; ``optimizer_state: reset`` clears them for the moved weights). theta_base and the next alpha are saved in
every checkpoint, so a resumed run extrapolates exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from esr.config import ExtrapolateConfig


def is_due(step: int, cfg: ExtrapolateConfig) -> bool:
    """Whether the optimizer step numbered ``step`` (1-based) is followed by an extrapolation."""
    if not cfg.enabled or step < 1:
        return False
    if cfg.schedule == "powers-of-two":
        return step & (step - 1) == 0
    return step % cfg.every == 0


def extrapolation_params(model: nn.Module, which: str) -> list[tuple[str, nn.Parameter]]:
    """The trained parameters that jump: ``attention-mlp`` keeps those of ``nn.Linear`` layers inside the decoder
    (LoRA's A and B, or q/k/v/o and MLP matrices and biases; not embeddings, norms or the output head);
    ``trainable`` keeps every parameter with ``requires_grad``."""
    if which == "trainable":
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decoder = model.get_decoder()
    linear = {id(p) for m in decoder.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
    chosen = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in linear]
    if not chosen:
        raise ValueError("optim.extrapolate.params=attention-mlp found no trained linear layer in the decoder; "
                         "use optim.extrapolate.params=trainable")
    return chosen


@dataclass
class ExtrapolationEvent:
    """What one extrapolation did (a line of ``<run>/extrapolate/events.jsonl``)."""

    step: int
    score_before: float
    """Probe loss after the optimizer step, before any jump."""
    score_after: float
    """Probe loss of the weights kept (= score_before when every try was rolled back)."""
    alphas_tried: list[float] = field(default_factory=list)
    scores_tried: list[float] = field(default_factory=list)
    alphas_accepted: list[float] = field(default_factory=list)
    seconds: float = 0.0
    probe_tokens: int = 0
    """Tokens the probe's forwards read over the event (for the FLOPs count)."""

    @property
    def tries(self) -> int:
        return len(self.alphas_tried)

    def as_row(self) -> dict[str, Any]:
        return {**asdict(self), "tries": self.tries, "accepted": len(self.alphas_accepted)}


class Extrapolator:
    """Keeps theta_base and runs the extrapolation line search (module docstring) at its steps.

    ``probe()`` returns the loss of the model's current weights; ``probe_tokens()`` (optional) how many tokens one
    call reads.
    """

    def __init__(
        self,
        params: list[tuple[str, nn.Parameter]],
        cfg: ExtrapolateConfig,
        probe: Callable[[], float],
        optimizer: torch.optim.Optimizer | None = None,
        probe_tokens: int = 0,
    ) -> None:
        self.names = [n for n, _ in params]
        self.params = [p for _, p in params]
        self.cfg, self.probe, self.optimizer, self.probe_tokens = cfg, probe, optimizer, probe_tokens
        with torch.no_grad():
            self.base = [p.detach().clone() for p in self.params]
        self.alpha = cfg.alpha
        """The next extrapolation's first alpha (``cfg.alpha`` unless ``carry_alpha``)."""

    def due(self, step: int) -> bool:
        return is_due(step, self.cfg)

    @torch.no_grad()
    def extrapolate(self, step: int) -> ExtrapolationEvent:
        """Run the line search now (after the optimizer step numbered ``step``); returns what it did."""
        t0 = time.perf_counter()
        best = self.probe()
        event = ExtrapolationEvent(step=step, score_before=best, score_after=best, probe_tokens=self.probe_tokens)
        backup = [p.detach().to("cpu", copy=True) for p in self.params]
        alpha = self.alpha
        for _ in range(self.cfg.max_tries):
            for p, base in zip(self.params, self.base, strict=True):
                p.add_(p - base, alpha=alpha)
            score = self.probe()
            event.alphas_tried.append(alpha)
            event.scores_tried.append(score)
            event.probe_tokens += self.probe_tokens
            if not (math.isfinite(score) and score < best - self.cfg.min_improvement):
                for p, saved in zip(self.params, backup, strict=True):
                    p.copy_(saved)
                break
            best = score
            event.alphas_accepted.append(alpha)
            for p, saved in zip(self.params, backup, strict=True):
                saved.copy_(p)
            alpha = alpha / (1 + alpha)
        del backup
        for p, base in zip(self.params, self.base, strict=True):
            base.copy_(p)
        self.alpha = alpha if self.cfg.carry_alpha else self.cfg.alpha
        if event.alphas_accepted and self.cfg.optimizer_state == "reset" and self.optimizer is not None:
            for p in self.params:
                self.optimizer.state.pop(p, None)  # AdamW re-initialises an empty state at its next step
        event.score_after = best
        event.seconds = time.perf_counter() - t0
        return event

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(theta_base by parameter name, plain state) for a checkpoint."""
        return {n: b.detach().cpu().contiguous() for n, b in zip(self.names, self.base, strict=True)}, {
            "alpha": self.alpha}

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"the checkpoint's extrapolation state lacks {missing[0]} (and {len(missing) - 1} more)")
        for n, b in zip(self.names, self.base, strict=True):
            b.copy_(tensors[n])
        self.alpha = float(state["alpha"])
