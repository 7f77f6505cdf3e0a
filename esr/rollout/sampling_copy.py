"""The student in another dtype for sampling (``rollout.dtype``), refreshed from the trained module every step.

The trainer keeps its master weights in ``train.dtype`` (float32 on a CPU) and computes the loss in float32; HF
``generate`` runs 2-3x faster in bfloat16 on CPUs with AVX-512 BF16 and on GPUs. ``SamplingCopy`` holds a second
module with the same architecture whose parameters are in the sample dtype, and ``refresh(model)`` writes the
trained module's current weights into it, in place (the copy's tensors keep their addresses, so a CUDA graph
captured on the copy by ``rollout.engine=hf-compiled`` stays valid):

- LoRA (a peft model): the copy holds plain layers with the merged weights W + scale * B @ A, computed from the
  trained module's frozen base weight W and its current adapters without touching the trained module (no
  ``merge_adapter``: the trained module's base weights stay W exactly). Only adapted layers and parameters that
  train are rewritten each step; frozen ones were cast once, when the copy was built.
- full fine-tuning: every parameter that trains is cast and copied (all of them).

Buffers (rotary ``inv_freq``) are copied as they are, in their own dtype, as ``from_pretrained(dtype=bfloat16)``
keeps them. The copy is built with ``copy.deepcopy`` whose memo maps each parameter to its cast copy, so the
full-precision weights are never duplicated and tied weights (embedding and head) stay tied.
"""

from __future__ import annotations

import copy
import time

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn

from esr.config import RolloutConfig
from esr.rollout.context import sample_dtype


def sampling_copy_for(cfg: RolloutConfig, model: nn.Module, train_dtype: torch.dtype | None) -> SamplingCopy | None:
    """The copy ``rollout.dtype`` asks for: None when it is the trainer's dtype (``auto`` always: the engine samples
    with the trained module itself, zero copies). ``train_dtype`` None: the model's own parameters' dtype."""
    train_dtype = next(model.parameters()).dtype if train_dtype is None else train_dtype
    dtype = sample_dtype(cfg, train_dtype)
    return None if dtype == train_dtype else SamplingCopy(model, dtype)


def hf_module(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside ``model``: a peft model's base (with its LoRA layers in place), else itself."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _lora_layers(module: nn.Module) -> dict[str, LoraLayer]:
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


class SamplingCopy:
    """``module``: the trained model's architecture with its parameters in ``dtype``, for ``generate``."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        self.dtype = dtype
        src = hf_module(model)
        memo: dict[int, object] = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False)
                                   for p in src.parameters()}
        module = copy.deepcopy(src, memo)
        for name, layer in _lora_layers(module).items():  # the adapted layers become plain layers (merged below)
            if any(layer.use_dora.get(a, False) for a in layer.active_adapters):
                raise NotImplementedError("rollout.dtype with DoRA adapters is not supported")
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
        self.module = module.eval()
        self.seconds_refresh = 0.0
        """Seconds the last ``refresh`` took (benchmarks/rollout_dtype.py reports it per step)."""
        self.refresh(model)

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        """Write ``model``'s current weights into the copy (module docstring): adapted layers as base + delta,
        every other parameter that requires grad cast and copied."""
        t0 = time.perf_counter()
        src = hf_module(model)
        lora = _lora_layers(src)
        dst_params = dict(self.module.named_parameters())
        for name, layer in lora.items():
            self._merge_into(dst_params[f"{name}.weight"], layer)
        skip = tuple(f"{name}." for name in lora)
        for name, p in src.named_parameters():
            if p.requires_grad and not name.startswith(skip):
                dst_params[name].copy_(p.detach())
        self.seconds_refresh = time.perf_counter() - t0

    @staticmethod
    def _merge_into(dst: torch.Tensor, layer: LoraLayer) -> None:
        """dst <- W + sum over active adapters of scale * B @ A, computed in W's dtype, then cast into dst."""
        w = layer.get_base_layer().weight.detach()
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        if not adapters or layer.disable_adapters:
            dst.copy_(w)
            return
        merged = None
        for a in adapters:
            if isinstance(layer, LoraLinear) and not layer.fan_in_fan_out:  # one fused kernel, one temporary
                merged = torch.addmm(w if merged is None else merged, layer.lora_B[a].weight.to(w.dtype),
                                     layer.lora_A[a].weight.to(w.dtype), alpha=layer.scaling[a])
            else:
                merged = (w if merged is None else merged) + layer.get_delta_weight(a).to(w.dtype)
        dst.copy_(merged)
