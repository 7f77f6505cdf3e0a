"""How the student samples: the horizon and the rollout engine (the ``rollout`` section of the run config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from esr.config.ranges import POSITIVE, at_least, between, ranged

Horizon = Literal["full", "esr", "progressive", "ratio", "auto"]
RolloutEngine = Literal["hf", "hf-compiled", "vllm", "vllm-server"]
RolloutDType = Literal["auto", "float32", "bfloat16"]


@dataclass(frozen=True)
class VllmConfig:
    url: str | None = None
    """`rollout.engine=vllm-server`: the server's http(s) URL (`python -m vllm.entrypoints.openai.api_server --model
    STUDENT --enable-lora`, started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1), e.g. `http://10.0.0.5:8000`."""
    model: str | None = None
    """The served base model's name in requests; None: the server's first model."""
    timeout_s: float = ranged(600.0, POSITIVE)
    """Seconds a request may wait for the server before the step fails."""
    retries: int = ranged(10, at_least(0))
    """Retries after a connection error, a 5xx or a 429, with exponential backoff (0.5 s doubling, at most 30 s between
    tries, jittered): 10 wait about 150 s (at least 75 s), long enough for a server to restart."""
    kv_cache_gib: float = ranged(1.0, POSITIVE)
    """`rollout.engine=vllm` and `teacher.engine=vllm`: GiB reserved for the KV cache (vLLM's own default takes 92%
    of a CPU machine's RAM)."""
    lora_sync: Literal["merged", "adapter"] = "merged"
    """`rollout.engine=vllm` with LoRA: `merged` reloads the adapted layers' merged weights W + scale * B @ A in place
    every step (the engine samples at its plain speed), `adapter` hands the adapter over as a new LoRARequest
    (vLLM applies it at run time: on this CPU 1.9x slower sampling in fp32, 2.2x in bf16; BENCHMARKS.md)."""
    max_model_len: int | None = ranged(None, at_least(2))
    """`rollout.engine=vllm` and `teacher.engine=vllm`: the engines' context length; None: the longest prompt plus
    rollout.max_new_tokens."""


@dataclass(frozen=True)
class AutoHorizonConfig:
    """`rollout.horizon=auto`: N picks itself from probe rollouts (esr/rollout/auto_horizon.py)."""

    every: int = ranged(30, at_least(1))
    """Steps between probes; the first runs before step 1. Each probe samples `rollouts` held-out answers to
    rollout.max_new_tokens and scores them with the teacher (no gradient). Measured on the quickstart pair (batch
    4, T=512, 2 CPU cores under load): a probe of 4 rollouts took 214 s (1250 tokens, the longest 453), a step at
    N=90 54 s, so one probe costs ~4 steps and every 30 steps keeps the probes near 12% (< 15%) of the run; each
    run logs the measured share as `probe_share`."""
    rollouts: int = ranged(4, at_least(1))
    """Probe rollouts per probe (held-out prompts, sampled together)."""
    share: float = ranged(0.45, between(0, 1, lo_open=True))
    """N is the first position where the cumulative per-position KL mass (summed over alive tokens) reaches this
    share of the total (the token-mass rule; the paper's ~45%)."""
    n_min: int = ranged(16, at_least(1))
    """The smallest N the rule may pick."""
    n_max: int | None = ranged(None, at_least(1))
    """The largest N the rule may pick; None: rollout.max_new_tokens."""
    ema: float = ranged(0.5, between(0, 1, lo_open=True))
    """Weight of the newest probe in the running per-position KL profile: profile = (1 - ema) * profile + ema *
    probe (1: only the newest probe counts)."""


@dataclass(frozen=True)
class RolloutConfig:
    horizon: Horizon = "esr"
    """How many tokens each rollout may have: `esr` (N), `full` (T), `progressive` (POPD), `ratio` (TOPD), `auto`
    (N chosen by probes every `rollout.auto.every` steps, starting from `rollout.n`; `rollout.auto`)."""
    n: int = ranged(100, at_least(1))
    """ESR's N: the rollout stops after the first N new tokens (or at EOS)."""
    max_new_tokens: int = ranged(512, at_least(1))
    """T: the full-rollout length and the cap of every horizon."""
    h0: int = ranged(50, at_least(1))
    """Progressive: the first horizon H_0."""
    dh: int = ranged(50, at_least(0))
    """Progressive: horizon growth dH every `every` steps."""
    every: int = ranged(10, at_least(1))
    """Progressive: steps between growths (dk)."""
    rho: float = ranged(0.1, between(0, 1, lo_open=True))
    """Ratio (TOPD): horizon = rho * T."""
    min_new_tokens: int = ranged(0, at_least(0))
    """Force at least this many new tokens (benchmarks use it to compare equal lengths)."""
    temperature: float = ranged(0.7, POSITIVE)
    """Sampling temperature (the paper's 0.7). The loss compares the untempered distributions."""
    top_p: float = ranged(1.0, between(0, 1, lo_open=True))
    """Nucleus sampling mass."""
    batch_size: int | None = ranged(None, at_least(1))
    """Sequences generated together; None generates the whole step's batch at once."""
    engine: RolloutEngine = "hf"
    """What samples the rollouts (esr/rollout/engine.py): `hf` (Hugging Face generate on the trainer's own model),
    `hf-compiled` (static KV cache and torch.compile: a GPU decode path without vLLM), `vllm` (an in-process vLLM
    engine, weights synced every step) or `vllm-server` (a vLLM server at `rollout.vllm.url`)."""
    dtype: RolloutDType = "auto"
    """Sampling precision: `auto` (the trainer's, train.dtype), `float32` or `bfloat16` (2-3x faster sampling on CPUs
    with AVX-512 BF16 and on GPUs; the trainer keeps its own dtype, and the loss is computed in float32)."""
    samples_per_prompt: int = ranged(1, at_least(1))
    """k: rollouts of each prompt per step (TRL's num_generations, tinker's group_size). A step's train.batch_size
    sequences are train.batch_size / k prompts, each sampled k times with its own seed (k must divide the batch)."""
    teacher_share: float = ranged(0.0, between(0, 1))
    """lambda: the share of a step's sequences sampled from the teacher instead of the student (GKD's mixture; TRL
    GKD's 1 - lmbda with seq_kd). Each sequence is the teacher's with probability lambda, drawn from (seed, step); the
    loss is the same per-token divergence at the teacher's tokens. Needs a local teacher sharing the student's
    tokenizer (teacher.engine=hf, no teacher.url)."""
    auto: AutoHorizonConfig = field(default_factory=lambda: AutoHorizonConfig())
    """Settings of `rollout.horizon=auto`."""
    vllm: VllmConfig = field(default_factory=lambda: VllmConfig())
    """Settings of the vLLM engines (`rollout.engine=vllm|vllm-server`)."""
