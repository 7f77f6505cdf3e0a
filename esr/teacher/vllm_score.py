"""The teacher in an in-process vLLM engine (``teacher.engine=vllm``): ``VLLMScorer``.

The teacher is never loaded with Hugging Face: a ``vllm.LLM`` holds it, in the trainer's dtype, and scores each
rollout row (its prompt without left padding, then its response, as token ids) in one ``generate`` call per step:

    SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False),  TokensPrompt(prompt_token_ids=row)

``prompt_logprobs`` gives, at every prompt position but the first, ``{token_id: Logprob(logprob, rank, ...)}``: the
scored token's own entry (always there, whatever its rank) and the top-k by rank. vLLM computes them from the raw
(untempered) logits, normalised over the teacher's whole vocabulary; the one generated token is discarded. From
them the scorer builds ``TopKTargets`` (``esr.teacher.targets``): ``loss.kind=topk`` (k = ``loss.top_k``) or
``loss.kind=sampled`` (k = 0: only the scored tokens' log-probs).

Normalisation: log p_t is over the teacher's V_t output columns. Where the student has fewer (V < V_t, e.g. two
sizes of one family padded differently), a top-k id >= V is not a bucket (``esr.losses.mask_top_columns``: its mass
stays in the teacher's tail), and the sampled estimator's log p_t(y) differs from the local path's by log Z_t, a
per-position baseline that leaves the expected gradient unchanged (``esr.train.remote_teacher``).

KV cache: ``rollout.vllm.kv_cache_gib`` (``esr.rollout.vllm_env``: on a CPU one process-wide setting,
``VLLM_CPU_KVCACHE_SPACE``, shared with an in-process vLLM rollout engine). ``close`` shuts the engine down; the
training loop calls it when the run ends, however it ends.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from esr.losses import mask_top_columns
from esr.rollout.vllm_env import engine_errors, import_vllm, vllm_kwargs
from esr.teacher.scorer import TOPK_KINDS, Capabilities, TeacherBatch
from esr.teacher.targets import TopKTargets
from esr.types import Rollouts

log = logging.getLogger("esr.train")


class VLLMScorer:
    """A ``TeacherScorer`` over a teacher in an in-process ``vllm.LLM``; ``seconds`` counts the scoring calls."""

    capabilities = Capabilities(loss_kinds=TOPK_KINDS, scores=frozenset({"hs"}),
                                where="with an in-process vLLM teacher (teacher.engine=vllm)")

    def __init__(self, source: str, *, dtype: torch.dtype, max_model_len: int, top_k: int, vocab_size: int,
                 seed: int = 0, kv_cache_gib: float = 2.0, enforce_eager: bool | None = None,
                 trust_remote_code: bool = False) -> None:
        """Start the engine on the model folder (or hub id) ``source``.

        Args:
            top_k: the top-k asked per position (``loss.top_k`` for ``loss.kind=topk``, 0 for ``sampled``).
            vocab_size: V, the student's logit columns (top ids past them are no buckets).
            enforce_eager: vLLM's; None: eager on a CPU (the engine starts in seconds), compiled on a GPU.
        """
        vllm = import_vllm(kv_cache_gib)
        self.top_k, self.vocab_size, self.seconds = top_k, vocab_size, 0.0
        eager = not torch.cuda.is_available() if enforce_eager is None else enforce_eager
        t0 = time.perf_counter()
        self.source, self.dtype, self.max_model_len = source, dtype, max_model_len
        self.llm: Any = vllm.LLM(model=source, enforce_eager=eager, max_logprobs=max(top_k, 1),
                                 trust_remote_code=trust_remote_code,
                                 **vllm_kwargs(dtype=dtype, max_model_len=max_model_len, seed=seed,
                                               kv_cache_gib=kv_cache_gib))
        self.seconds_start = time.perf_counter() - t0
        # One discarded generated token (some vLLM versions refuse max_tokens=0), the prompt's top-k log-probs.
        self.sampling = vllm.SamplingParams(max_tokens=1, prompt_logprobs=top_k, detokenize=False, temperature=0.0)
        self._rollouts: Rollouts | None = None
        self._scores: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        log.info("teacher.engine=vllm: %s started in %.1f s (top_k %d)", source, self.seconds_start, top_k)

    @property
    def params(self) -> int:
        """The teacher's parameter count, from its safetensors headers (0 when its folder is not local)."""
        return safetensors_params(self.source)

    def describe(self) -> dict[str, Any]:
        """What run.json records about the teacher engine."""
        return {"engine": "vllm", "model": self.source, "dtype": str(self.dtype).removeprefix("torch."),
                "top_k": self.top_k, "normalised_columns": self.vocab_size,
                "seconds_start": round(self.seconds_start, 2)}

    def read(self, rollouts: Rollouts, prompt_index: Sequence[int]) -> TeacherBatch:
        """The engine reads the student's own tokens: every response token can be scored."""
        return TeacherBatch(rollouts=rollouts, teacher_rollouts=rollouts, valid_B_R=rollouts.response_mask_B_R)

    def targets(self, batch: TeacherBatch, micro_batch_size: int,
                rows_per_pass: int | None = None) -> Iterator[TopKTargets]:
        """Each micro-batch's rows of the batch's scores, fetched in one engine call for the whole batch when the
        first micro-batch asks (vLLM batches the rows itself; ``rows_per_pass`` is unused)."""
        rollouts = batch.rollouts
        for a in range(0, len(rollouts), micro_batch_size):
            n_resp = rollouts.slice(a, a + micro_batch_size).response_mask_B_R.shape[1]
            logp_B_R, ids_B_R_K, top_B_R_K = self.score_rollouts(rollouts)
            rows, cols = slice(a, a + micro_batch_size), slice(0, n_resp)
            yield TopKTargets(logp_B_R[rows, cols], ids_B_R_K[rows, cols], top_B_R_K[rows, cols])

    def score_rollouts(self, rollouts: Rollouts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log p_t of each sampled response token (B, R), top-k ids (B, R, K), their log-probs (B, R, K)), float32
        / int64 CPU tensors, 0 past each row's end; top ids the student lacks are masked. Scored once per batch
        object; later calls with it reuse the answer."""
        if rollouts is not self._rollouts:
            t0 = time.perf_counter()
            rows = row_sequences(rollouts)
            prompts = [{"prompt_token_ids": seq} for seq, _ in rows]
            with engine_errors("the in-process vLLM teacher (teacher.engine=vllm)", self.max_model_len):
                outputs = self.llm.generate(prompts, self.sampling, use_tqdm=False)
            self._scores = self._layout(rollouts, rows, [o.prompt_logprobs for o in outputs])
            self._rollouts = rollouts
            self.seconds += time.perf_counter() - t0
        assert self._scores is not None
        return self._scores

    def _layout(self, rollouts: Rollouts, rows: list[tuple[list[int], int]],
                positions: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, R, k = len(rows), rollouts.response_mask_B_R.shape[1], self.top_k
        logp_B_R = torch.zeros((B, R), dtype=torch.float32)
        ids_B_R_K = torch.zeros((B, R, k), dtype=torch.long)
        top_B_R_K = torch.zeros((B, R, k), dtype=torch.float32)
        for b, ((seq, start), entries) in enumerate(zip(rows, positions, strict=True)):
            if entries is None or len(entries) != len(seq):
                raise RuntimeError(f"vLLM returned no prompt log-probs for every token of rollout row {b}")
            for r, j in enumerate(range(start, len(seq))):
                logp_B_R[b, r] = entries[j][seq[j]].logprob
                best = sorted(entries[j].items(), key=lambda kv: (kv[1].rank, -kv[1].logprob))[:k]
                ids_B_R_K[b, r, : len(best)] = torch.tensor([i for i, _ in best], dtype=torch.long)
                top_B_R_K[b, r, : len(best)] = torch.tensor([v.logprob for _, v in best], dtype=torch.float32)
        ids_B_R_K, top_B_R_K = mask_top_columns(ids_B_R_K, top_B_R_K, self.vocab_size)
        return logp_B_R, ids_B_R_K, top_B_R_K

    def close(self) -> None:
        """Shut the engine down and free its memory (idempotent)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def safetensors_params(folder: str) -> int:
    """Elements of every tensor in the ``*.safetensors`` files of ``folder`` (read from their headers), 0 when
    ``folder`` is not a local folder."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                total += math.prod(f.get_slice(key).get_shape())
    return total


def row_sequences(rollouts: Rollouts) -> list[tuple[list[int], int]]:
    """Each row as (its tokens without left padding: prompt then response, the index of its first response token).
    A row with an empty prompt is refused: its first response token would have no context."""
    P = rollouts.prompt_len
    out = []
    for b, n in enumerate(rollouts.lengths_B.tolist()):
        prompt_mask = rollouts.attention_mask_B_L[b, :P]
        if not bool(prompt_mask.any()):
            raise ValueError(f"rollout row {b} has an empty prompt: its first response token has no context")
        first = int(prompt_mask.argmax())
        out.append((rollouts.input_ids_B_L[b, first : P + n].tolist(), P - first))
    return out
