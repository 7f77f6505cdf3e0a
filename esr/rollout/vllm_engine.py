"""``rollout.engine=vllm``: rollouts from an in-process ``vllm.LLM`` that shares the machine with the trainer.

Per step (``esr.train.run_step._sample``):

    sync_weights(student)   full fine-tuning: every weight is reloaded in place (``reload_weights``, which handles
                            the CPU backend's repacked layers); LoRA (``rollout.vllm.lora_sync=merged``, default):
                            only the adapted layers, as merged weights W + scale * B @ A, reloaded the same way;
                            then the prefix cache, which holds KV computed with the old weights, is cleared.
                            ``lora_sync=adapter``: the adapter is saved to a fresh folder and handed over as a new
                            ``LoRARequest`` (a new id per step: no stale adapter, no stale prefix-cache entry), and
                            vLLM applies it at run time, which on the CPU made sampling 1.9x (fp32) to 2.2x (bf16)
                            slower (benchmarks/vllm_sampling.py).
    sample(prompts, N)      one request per row, fed token ids (no re-tokenisation), seeded per row, at most N
                            tokens, stopping at the run's EOS ids (``esr.rollout.requests`` is the contract), and
                            the engine's raw log-prob of every sampled token in ``Rollouts.logprobs_B_R``.

The engine holds its own copy of the weights, in ``rollout.dtype`` (bf16 samples 1.3-2.5x faster on a CPU with
AVX-512 BF16, ASSETS.md), while the trainer keeps its own dtype; the step compares the two engines' log-probs of
the sampled tokens (the on-policy health metric, esr.train.step).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esr.config import ConfigError, RolloutConfig
from esr.rollout.context import EngineContext, sample_dtype
from esr.rollout.requests import RowRequest, rollouts_from_rows, row_requests
from esr.rollout.vllm_env import engine_errors, import_vllm, vllm_kwargs
from esr.types import Rollouts

ENGINE = "the in-process vLLM rollout engine (rollout.engine=vllm)"

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``max_lora_rank`` values vLLM accepts."""


class VLLMSampler:
    """The ``vllm`` rollout engine (module docstring)."""

    def __init__(self, cfg: RolloutConfig, *, eos_token_ids: Sequence[int], pad_token_id: int,
                 context: EngineContext) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ConfigError("rollout.engine=vllm runs one engine beside one training process; with several "
                              "processes (torchrun, accelerate) use rollout.engine=hf or a shared "
                              "rollout.engine=vllm-server")
        self.vllm = import_vllm(cfg.vllm.kv_cache_gib)
        self.cfg, self.context = cfg, context
        self.eos_token_ids, self.pad_token_id = list(eos_token_ids), pad_token_id
        self.lora = context.finetune == "lora" and cfg.vllm.lora_sync == "adapter"  # else weights are reloaded
        self.dtype = sample_dtype(cfg, context.train_dtype)
        kwargs = vllm_kwargs(dtype=self.dtype, max_model_len=context.max_model_len, seed=context.seed,
                             kv_cache_gib=cfg.vllm.kv_cache_gib)
        if self.lora:
            rank = next((r for r in LORA_RANKS if r >= context.lora_rank), None)
            if rank is None:
                raise ConfigError(f"lora.r={context.lora_rank} is above vLLM's largest LoRA rank {LORA_RANKS[-1]}")
            kwargs.update(enable_lora=True, max_lora_rank=rank, max_loras=1)
        if not torch.cuda.is_available():
            kwargs["enforce_eager"] = True  # CPU: no graph compilation (start-up in seconds, see BENCHMARKS.md)
        self.llm: Any = self.vllm.LLM(context.source, **kwargs)
        self.adapter_root = Path(tempfile.mkdtemp(prefix="esr-vllm-lora-")) if self.lora else None
        self.lora_request: Any = None
        self.version = 0

    def sync_weights(self, model: nn.Module) -> None:
        """Hand the trainer's current weights to the engine (module docstring)."""
        self.version += 1
        if self.lora:
            self._sync_adapter(model)
            return
        weights = _merged_lora_weights(model) if self.context.finetune == "lora" else _full_weights(model)
        with engine_errors(ENGINE, self.context.max_model_len):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
            self.llm.reset_prefix_cache()

    def _sync_adapter(self, model: nn.Module) -> None:
        assert self.adapter_root is not None
        folder = self.adapter_root / f"v{self.version}"
        # The adapter only (what peft's save_pretrained writes; never the embeddings, which esr does not resize).
        _unwrapped(model).save_pretrained(str(folder), save_embedding_layers=False)
        old = self.lora_request
        self.lora_request = self.vllm.lora.request.LoRARequest(f"esr-v{self.version}", self.version, str(folder))
        if old is not None:
            shutil.rmtree(old.lora_path, ignore_errors=True)  # vLLM read it when it was first used

    @torch.no_grad()
    def sample(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *, seed: int,
               row_ids: Sequence[int] | None = None, pad_to: int = 0) -> Rollouts:
        """One response per prompt (``esr.rollout.engine.Sampler.sample``), with the engine's log-probs. Before the
        first ``sync_weights`` the engine samples the weights it loaded, the student's initial ones (a fresh LoRA
        adapter is the identity): what EffOPD's probe, built before the first step, samples."""
        requests = row_requests(prompt_ids, max_new_tokens, seed=seed, row_ids=row_ids,
                                eos_token_ids=self.eos_token_ids, temperature=self.cfg.temperature,
                                top_p=self.cfg.top_p, min_new_tokens=self.cfg.min_new_tokens)
        prompts = [self.vllm.inputs.TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in requests]
        with engine_errors(ENGINE, self.context.max_model_len):
            outputs = self.llm.generate(prompts, [self._params(r) for r in requests],
                                        lora_request=self.lora_request, use_tqdm=False)
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        logprobs = [_sampled_logprobs(o.outputs[0]) for o in outputs]
        return rollouts_from_rows(prompt_ids, tokens, logprobs, eos_token_ids=self.eos_token_ids,
                                  pad_token_id=self.pad_token_id, horizon=max_new_tokens, pad_to=pad_to)

    def _params(self, r: RowRequest) -> Any:
        """vLLM's ``SamplingParams`` for one row: temperature and top-p only, the row's seed, esr's EOS ids."""
        return self.vllm.SamplingParams(
            n=1, max_tokens=r.max_tokens, min_tokens=r.min_tokens, temperature=r.temperature, top_p=r.top_p,
            top_k=0, min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, seed=r.seed,
            stop_token_ids=list(r.stop_token_ids), ignore_eos=True, logprobs=0, detokenize=False,
            skip_special_tokens=False)

    def close(self) -> None:
        """Free the engine and the adapter folders (idempotent)."""
        if getattr(self, "llm", None) is not None:
            engine = getattr(self.llm, "llm_engine", None)
            if engine is not None and hasattr(engine, "engine_core"):
                engine.engine_core.shutdown()
            self.llm = None
        if self.adapter_root is not None:
            shutil.rmtree(self.adapter_root, ignore_errors=True)
            self.adapter_root = None


def _sampled_logprobs(completion: Any) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-position ``{token_id: Logprob}`` dicts (``logprobs=0``
    returns just the sampled token's entry)."""
    entries = completion.logprobs or []
    return [float(entry[token].logprob) for token, entry in zip(completion.token_ids, entries, strict=True)]


def _full_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every weight under its checkpoint name."""
    return [(name, t.detach()) for name, t in _unwrapped(model).state_dict().items()]


@torch.no_grad()
def _merged_lora_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The adapted layers' weights with the adapter merged, W + scale * B @ A (peft's ``get_delta_weight``), under
    their checkpoint names; the trained module is not touched. The frozen rest is what the engine loaded."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    peft_model = _unwrapped(model)
    if not isinstance(peft_model, PeftModel):
        raise TypeError("rollout.vllm.lora_sync=merged needs the peft model of train.finetune=lora")
    weights = []
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer().weight
            delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
            weights.append((f"{name}.weight", (base + delta).detach()))
    return weights


def _unwrapped(model: nn.Module) -> nn.Module:
    """The HF model under a DDP or ``torch.compile`` wrapper, whose state-dict names are the checkpoint's."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
