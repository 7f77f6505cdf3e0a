"""`RemoteTeacher`: the client of a teacher server, esr's own (`esr serve-teacher`) or vLLM's (`vllm serve`).

Two dialects, one result:

- ``dialect="esr"`` posts ``{"sequences", "start", "top_k"}`` to ``/v1/score`` and reads ``logprobs`` /
  ``top_ids`` / ``top_logprobs`` (shapes in ``esr.serve.protocol``); only the positions from ``start`` on travel.
- ``dialect="openai"`` posts ``{"model", "prompt": [[ids]], "max_tokens": 1, "prompt_logprobs": k}`` to
  ``/v1/completions`` and reads vLLM's ``choices[i].prompt_logprobs`` (``[null, {"<id>": {"logprob", "rank",
  "decoded_token"}}, ...]``): the given token's entry is its log-prob, the entries of rank 1..k the top-k. The
  server scores the whole sequence and the client keeps the positions from ``start`` on. vLLM computes prompt
  log-probs from the raw (untempered) logits; ``max_tokens=1`` because some vLLM versions refuse 0 without echo.

Normalisation: esr's server normalises over its whole output layer, or over its first ``vocab_size`` columns when
``score(..., vocab_size=V)`` asks (what the trainer does when the teacher's output layer is wider than the columns it
shares with the student); vLLM always normalises over its whole vocabulary.

Either way ``score`` returns, per sequence, ``ScoredSequence(logprobs (n,), top_ids (n, k), top_logprobs (n, k))``
as CPU tensors with n = len(sequence) - start, and ``score_rollouts`` lays them out as (B, R) / (B, R, K) tensors
aligned with ``Rollouts.response_mask_B_R``.

Failures (``esr.http``): a connection error, a 5xx or a 429 is retried ``retries`` times with exponential backoff and
jitter (``backoff_s * 2**attempt``, times a random factor in [0.5, 1.5), at least the server's Retry-After); any other
4xx is the caller's mistake and raises ``RemoteTeacherError`` at once with the server's message. A server that sends
nothing for ``timeout_s`` raises at once too (retrying would pile more work on a server that is already behind).
One ``RemoteTeacher`` holds one HTTP session: use one per thread.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import requests
import torch

from esr.http import request
from esr.serve.errors import RemoteTeacherError
from esr.types import Rollouts


class ScoredSequence(NamedTuple):
    """One sequence's scores from its start position on (n positions), CPU tensors."""

    logprobs: torch.Tensor
    """(n,) float32: the teacher's log p(x_j | x_<j) for j = start .. len - 1."""
    top_ids: torch.Tensor
    """(n, k) int64: the k most likely tokens at those positions, most likely first."""
    top_logprobs: torch.Tensor
    """(n, k) float32."""


class RolloutScores(NamedTuple):
    """The teacher's view of a batch of rollouts, aligned with ``Rollouts.response_mask_B_R`` (0 where False);
    CPU tensors, whatever device the rollouts are on."""

    logprobs_B_R: torch.Tensor
    """(B, R) float32: log p_t of each sampled response token."""
    top_ids_B_R_K: torch.Tensor
    """(B, R, K) int64 (K = top_k, 0 allowed)."""
    top_logprobs_B_R_K: torch.Tensor
    """(B, R, K) float32."""


class RemoteTeacher:
    """Scores token sequences on a teacher server (see the module docstring for the protocol and retries)."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_batch_sequences: int = 16,
        dialect: Literal["esr", "openai"] = "esr",
        model: str | None = None,
    ) -> None:
        if dialect not in ("esr", "openai"):
            raise ValueError(f"dialect must be 'esr' or 'openai', not {dialect!r}")
        if max_batch_sequences < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError("max_batch_sequences must be >= 1, retries >= 0 and timeout_s > 0")
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_batch_sequences = max_batch_sequences
        self.dialect = dialect
        self.model = model
        """The served model's name, sent in openai requests (vLLM wants it); looked up on first use when None."""
        self.seconds = 0.0
        """Wall seconds spent in ``score`` calls (HTTP, waiting and JSON included), like ``LocalScorer.seconds``."""
        self.server_seconds = 0.0
        """Seconds the server reported running its model for this client's requests (esr dialect only)."""
        self._session = requests.Session()
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"

    def health(self, vocab_prefix: int | None = None) -> dict[str, Any]:
        """esr: the server's /health (model, vocab_size, dtype, limits, tokenizer digest; with ``vocab_prefix`` also
        the digest of the first that many ids, ``esr.serve.vocab``). openai: ``{"model", "models"}`` from
        /v1/models."""
        if self.dialect == "esr":
            return self._request("GET", "/health" if vocab_prefix is None else f"/health?vocab_prefix={vocab_prefix}")
        ids = [m["id"] for m in self._request("GET", "/v1/models").get("data", [])]
        return {"model": ids[0] if ids else None, "models": ids}

    def score(
        self, sequences: Sequence[Sequence[int]], starts: int | Sequence[int], top_k: int = 0,
        vocab_size: int | None = None,
    ) -> list[ScoredSequence]:
        """Teacher log-probs of each sequence's tokens from its start on (1 <= start <= len), plus the top-k;
        sent in requests of at most ``max_batch_sequences`` sequences. ``vocab_size`` (esr dialect only):
        normalise over the first that many logit columns instead of the whole output layer."""
        if vocab_size is not None and self.dialect != "esr":
            raise ValueError("vocab_size is an esr-dialect field: the openai dialect normalises over the server's "
                             "whole output layer")
        seqs = [[int(t) for t in s] for s in sequences]
        try:
            start_list = [int(s) for s in starts]  # type: ignore[union-attr]
        except TypeError:  # one start for every sequence
            start_list = [int(starts)] * len(seqs)  # type: ignore[arg-type]
        if len(start_list) != len(seqs):
            raise ValueError(f"{len(start_list)} starts for {len(seqs)} sequences")
        out: list[ScoredSequence] = []
        t0 = time.perf_counter()
        for a in range(0, len(seqs), self.max_batch_sequences):
            batch, batch_starts = seqs[a : a + self.max_batch_sequences], start_list[a : a + self.max_batch_sequences]
            if self.dialect == "esr":
                out.extend(self._score_esr(batch, batch_starts, top_k, vocab_size))
            else:
                out.extend(self._score_openai(batch, batch_starts, top_k))
        self.seconds += time.perf_counter() - t0
        return out

    def score_rollouts(self, rollouts: Rollouts, top_k: int = 0, vocab_size: int | None = None) -> RolloutScores:
        """Teacher log-probs of the sampled response tokens, (B, R), and the top-k, (B, R, K), zero where
        ``response_mask_B_R`` is False. Each row is sent without its left padding, its prompt as context."""
        P, R = rollouts.prompt_len, rollouts.response_mask_B_R.shape[1]
        lengths = rollouts.lengths_B.tolist()
        sequences, starts = [], []
        for b, n in enumerate(lengths):
            ids = rollouts.input_ids_B_L[b, : P + n]
            first = int(rollouts.attention_mask_B_L[b, :P].argmax()) if rollouts.attention_mask_B_L[b, :P].any() else P
            if first == P:
                raise ValueError(f"rollout row {b} has an empty prompt: its first response token has no context")
            sequences.append(ids[first:].tolist())
            starts.append(P - first)
        scored = self.score(sequences, starts, top_k, vocab_size)
        logprobs_B_R = torch.zeros((len(lengths), R), dtype=torch.float32)
        top_ids_B_R_K = torch.zeros((len(lengths), R, top_k), dtype=torch.long)
        top_logprobs_B_R_K = torch.zeros((len(lengths), R, top_k), dtype=torch.float32)
        for b, (n, s) in enumerate(zip(lengths, scored, strict=True)):
            logprobs_B_R[b, :n] = s.logprobs
            top_ids_B_R_K[b, :n] = s.top_ids
            top_logprobs_B_R_K[b, :n] = s.top_logprobs
        return RolloutScores(logprobs_B_R, top_ids_B_R_K, top_logprobs_B_R_K)

    # --- the two dialects -------------------------------------------------------------------------------------

    def _score_esr(self, seqs: list[list[int]], starts: list[int], top_k: int, vocab_size: int | None
                   ) -> list[ScoredSequence]:
        body: dict[str, Any] = {"sequences": seqs, "start": starts, "top_k": top_k}
        if vocab_size is not None:  # only when asked: servers that predate the field refuse unknown keys
            body["vocab_size"] = vocab_size
        reply = self._request("POST", "/v1/score", body)
        self.server_seconds += float(reply.get("seconds", 0.0))
        out = []
        for i, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
            n = len(seq) - start
            try:
                logprobs = torch.tensor(reply["logprobs"][i], dtype=torch.float32)
                if logprobs.shape != (n,):
                    raise ValueError(f"expected {n} log-probs, got {len(logprobs)}")
                if top_k:
                    top_ids = torch.tensor(reply["top_ids"][i], dtype=torch.long).reshape(n, top_k)
                    top_logprobs = torch.tensor(reply["top_logprobs"][i], dtype=torch.float32).reshape(n, top_k)
                else:
                    top_ids, top_logprobs = torch.zeros((n, 0), dtype=torch.long), torch.zeros((n, 0))
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
                raise RemoteTeacherError(f"{self.url}: malformed reply for sequence {i}: {err}") from err
            out.append(ScoredSequence(logprobs, top_ids, top_logprobs))
        return out

    def _score_openai(self, seqs: list[list[int]], starts: list[int], top_k: int) -> list[ScoredSequence]:
        if self.model is None:
            self.model = self.health()["model"]
        body = {"model": self.model, "prompt": seqs, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": top_k}
        choices = sorted(self._request("POST", "/v1/completions", body)["choices"], key=lambda c: c["index"])
        if len(choices) != len(seqs):
            raise RemoteTeacherError(f"{self.url}: {len(choices)} choices for {len(seqs)} prompts")
        out = []
        for seq, start, choice in zip(seqs, starts, choices, strict=True):
            positions = choice.get("prompt_logprobs")
            if positions is None or len(positions) != len(seq):
                raise RemoteTeacherError(f"{self.url}: the reply has no prompt_logprobs for every prompt token")
            logprobs, top_ids, top_logprobs = [], [], []
            try:
                for j in range(start, len(seq)):
                    entries = positions[j]
                    logprobs.append(float(entries[str(seq[j])]["logprob"]))
                    best = sorted(entries.items(), key=lambda kv: (kv[1]["rank"], -kv[1]["logprob"]))[:top_k]
                    top_ids.append([int(k) for k, _ in best])
                    top_logprobs.append([float(v["logprob"]) for _, v in best])
                n = len(seq) - start
                out.append(ScoredSequence(
                    torch.tensor(logprobs, dtype=torch.float32),
                    torch.tensor(top_ids, dtype=torch.long).reshape(n, top_k),
                    torch.tensor(top_logprobs, dtype=torch.float32).reshape(n, top_k),
                ))
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
                raise RemoteTeacherError(f"{self.url}: malformed prompt_logprobs: {err!r}") from err
        return out

    # --- HTTP with retries -------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, payload: Any = None) -> Any:
        return request(self._session, method, self.url + path, payload, error=RemoteTeacherError,
                       headers=self._headers, timeout_s=self.timeout_s, retries=self.retries,
                       backoff_s=self.backoff_s)

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> RemoteTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

