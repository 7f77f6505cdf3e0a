"""The seam between the training loop and a rollout engine: ``Sampler``, and ``make_sampler`` that picks one.

A run picks its engine once, when the session is built, by ``rollout.engine``:

    hf            Hugging Face ``generate`` on the trainer's own module, or on a copy in ``rollout.dtype`` refreshed
                  every step (esr.rollout.sampling_copy)                          (esr.rollout.sampler.HFSampler)
    hf-compiled   the same with a static KV cache and ``torch.compile`` (a GPU decode path where vLLM cannot be
                  installed)                                                        (esr.rollout.compiled)
    vllm          an in-process ``vllm.LLM`` (colocated): LoRA adapters handed over as a new ``LoRARequest``, full
                  weights reloaded in place, before every step's sampling            (esr.rollout.vllm_engine)
    vllm-server   a running vLLM OpenAI-compatible server (``rollout.vllm.url``): adapters loaded through its
                  ``/v1/load_lora_adapter``                                          (esr.rollout.vllm_server)

Every engine takes prompt ids, the horizon and per-row seeds and returns ``Rollouts``; the vLLM ones also return
their log-probs of the sampled tokens (``Rollouts.logprobs_B_R``), which the step compares with the trainer's own
(the on-policy health metric, esr.train.step). ``esr.rollout.requests`` fixes the sampling contract they share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from torch import nn

from esr.config import ConfigError, RolloutConfig
from esr.rollout.context import EngineContext, sample_dtype  # noqa: F401  (re-exported)
from esr.rollout.sampler import HFSampler
from esr.rollout.sampling_copy import sampling_copy_for
from esr.types import Rollouts

ENGINES = ("hf", "hf-compiled", "vllm", "vllm-server")
"""The values ``rollout.engine`` may take."""


@runtime_checkable
class Sampler(Protocol):
    """A rollout engine, as the training loop sees it."""

    def sample(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *, seed: int,
               row_ids: Sequence[int] | None = None, pad_to: int = 0) -> Rollouts:
        """Sample one response per prompt, at most ``max_new_tokens`` tokens, stopping each row at EOS; row b's
        randomness is keyed by ``(seed, row_ids[b])`` (default b), so a row's sample does not depend on the other
        rows; prompts are left-padded to at least ``pad_to`` columns (a process sampling its shard of a batch
        passes the whole batch's longest prompt)."""
        ...

    def sync_weights(self, model: nn.Module) -> None:
        """Make the engine sample from ``model``'s current weights. The loop calls it before every step's sampling
        (so after optimizer steps, extrapolation and a resume's checkpoint load alike); an engine that samples with
        the trainer's own module has nothing to do, one with its own copy (vLLM) loads the weights or the LoRA
        adapter here."""
        ...

    def close(self) -> None:
        """Free the engine (a vLLM engine's memory and threads, a server's adapters); idempotent."""
        ...


def make_sampler(cfg: RolloutConfig, model: nn.Module, *, eos_token_ids: Sequence[int], pad_token_id: int,
                 context: EngineContext | None = None) -> Sampler:
    """The ``rollout.engine`` sampler for ``model`` with ``rollout``'s temperature, top-p, minimum length and
    generation batch size. The vLLM engines need ``context`` (the student's folder, how it is fine-tuned); the HF
    ones read the trainer's dtype from it (else from ``model``) to tell whether ``rollout.dtype`` asks for a
    sample-dtype copy of the student (esr.rollout.sampling_copy)."""
    if cfg.engine not in ENGINES:  # load_config checks it too; a config built in code may hold anything
        raise ConfigError(f"rollout.engine={cfg.engine!r} is not one of {', '.join(ENGINES)}")
    if cfg.engine == "hf":
        return HFSampler(model, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, temperature=cfg.temperature,
                         top_p=cfg.top_p, min_new_tokens=cfg.min_new_tokens, batch_size=cfg.batch_size,
                         sampling_copy=sampling_copy_for(cfg, model, context and context.train_dtype))
    if cfg.engine == "hf-compiled":
        from esr.rollout.compiled import CompiledHFSampler

        return CompiledHFSampler(model, cfg, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, context=context)
    if context is None:
        raise ValueError(f"rollout.engine={cfg.engine} needs an EngineContext (the student's folder and fine-tuning)")
    if cfg.engine == "vllm":
        from esr.rollout.vllm_engine import VLLMSampler

        return VLLMSampler(cfg, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, context=context)
    from esr.rollout.vllm_server import VLLMServerSampler

    return VLLMServerSampler(cfg, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, context=context)
