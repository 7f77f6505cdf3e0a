"""Batched student sampling with a KV cache (Hugging Face ``generate``), seeded per step AND per row.

On-policy distillation needs samples from the student's own (tempered) distribution, so the sampler builds its own
``GenerationConfig`` instead of inheriting a model's defaults: a hub model's ``top_k=20`` or
``repetition_penalty=1.1`` would silently make the rollouts off-policy.

Per-row randomness. ``generate`` runs greedy (``do_sample=False``); its last logits processor, ``RowSampling``,
draws row b's token itself and leaves only that token finite, so greedy's argmax takes it. At each step t,
with s_b = top_p(logits_b / T) (HF's warpers) and p_b = softmax(s_b) over the V tokens:

    u_{b,t} = the t-th uniform in [0, 1) of a CPU torch.Generator seeded by row_seed(seed, row_id[b])
    token   = min{v : C_b[v] > u_{b,t} * C_b[V-1]},   C_b = cumsum(p_b) in float64       (inverse CDF)

an exact sample of p_b (a token of probability 0 is never drawn). A row's tokens are thus a function of (seed, its
row id, its prompt) alone: not of which other rows share its batch or where it sits in it, since every operation
is per row (softmax, sort and cumsum along a row; IEEE-exact elementwise division). A process holding a shard of a
step's batch samples what one process sampling the whole batch samples for those rows (``esr.train.distributed``),
up to floating rounding of the logits themselves, which could move a boundary past u only in a near-tie
(``pad_to`` gives a shard's rows the same left padding as the whole batch's, so the model sees the same inputs).
The CPU generators make the draws the same on every device.

Why not Gumbel-max (argmax s_b + g, g = -log(-log u))? It needs V uniforms and two logs per row and step; for
B = 16 rows of a 152k vocabulary that measured ~3-15x the cost of this inverse CDF on this 2-core CPU (both exact),
and the logs are not correctly rounded, so SIMD vs scalar code paths could differ in the last bit between batches.

HF's own processors run before ``RowSampling``: ``min_new_tokens`` sets EOS to -inf (probability 0 here), and EOS
and padding after a row's end are greedy's. Temperature 0 is plain greedy decoding (no processor, no draws).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from esr.types import Rollouts

if TYPE_CHECKING:
    from esr.rollout.sampling_copy import SamplingCopy


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to (B, P) ids and attention mask, so every response starts at column P."""
    P = max(len(p) for p in prompt_ids)
    ids_B_P = torch.full((len(prompt_ids), P), pad_token_id, dtype=torch.long)
    mask_B_P = torch.zeros((len(prompt_ids), P), dtype=torch.long)
    for b, p in enumerate(prompt_ids):
        if len(p):
            ids_B_P[b, P - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask_B_P[b, P - len(p) :] = 1
    return ids_B_P, mask_B_P


def build_rollouts(
    prompt_ids_B_P: torch.Tensor,
    prompt_mask_B_P: torch.Tensor,
    new_tokens_B_R: torch.Tensor,
    eos_token_ids: Sequence[int],
    horizon: int,
) -> Rollouts:
    """Turn ``generate``'s padded output into Rollouts with an EOS-aware response mask.

    A row's response is every token up to and including its first EOS; a row without EOS is cut by the horizon and
    keeps all its tokens. What follows the first EOS is padding (which may itself be EOS when pad == eos).
    """
    B, R = new_tokens_B_R.shape
    is_eos_B_R = torch.isin(new_tokens_B_R, torch.tensor(list(eos_token_ids), dtype=new_tokens_B_R.dtype))
    has_eos_B = is_eos_B_R.any(dim=1)
    first_eos_B = torch.where(has_eos_B, is_eos_B_R.int().argmax(dim=1), torch.full((B,), R))
    length_B = torch.where(has_eos_B, first_eos_B + 1, torch.full((B,), R))
    response_mask_B_R = torch.arange(R).unsqueeze(0) < length_B.unsqueeze(1)
    return Rollouts(
        input_ids_B_L=torch.cat([prompt_ids_B_P, new_tokens_B_R], dim=1),
        attention_mask_B_L=torch.cat([prompt_mask_B_P, response_mask_B_R.long()], dim=1),
        response_mask_B_R=response_mask_B_R,
        prompt_len=prompt_ids_B_P.shape[1],
        horizon=horizon,
        cut_B=~has_eos_B,
    )


def row_seed(seed: int, row_id: int) -> int:
    """The seed of row ``row_id``'s stream in a call seeded ``seed``: a 64-bit mix (splitmix-style), so nearby
    (seed, row) pairs get unrelated streams. In [0, 2**63), as torch.Generator.manual_seed wants."""
    x = (seed * 0x9E3779B97F4A7C15 + row_id * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) % (1 << 64)
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return (x ^ (x >> 31)) >> 1


class RowSampling(LogitsProcessor):
    """Temperature, top-p, then one inverse-CDF draw per row from that row's own stream (module docstring).

    ``__call__`` maps scores (B, V) to (B, V): 0 at each row's drawn token, -inf elsewhere, so greedy's argmax is
    the draw. Rows are matched to ``row_ids`` by position: (B,) must equal len(row_ids) at every step.
    """

    BLOCK = 64
    """Uniforms drawn (and copied to the device) per row at a time."""

    def __init__(self, temperature: float, top_p: float, seed: int, row_ids: Sequence[int]) -> None:
        self.warpers = LogitsProcessorList(
            ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else [])
            + ([TopPLogitsWarper(top_p)] if top_p < 1.0 else []))
        self.generators = [torch.Generator().manual_seed(row_seed(seed, r)) for r in row_ids]
        self.u_B_K: torch.Tensor | None = None
        self.k = 0

    def _uniforms(self, device: torch.device) -> torch.Tensor:
        """This step's u_{b,t}, (B, 1) on ``device``. Each row's stream is drawn BLOCK values at a time (CPU
        generators fill a tensor serially, so the t-th value is the same as drawing one at a time) and copied to
        the device once per block: on a GPU a host-to-device copy every token would stall every step."""
        if self.u_B_K is None or self.k == self.u_B_K.shape[1]:
            self.u_B_K = torch.stack([torch.rand((self.BLOCK,), generator=g, dtype=torch.float64)
                                      for g in self.generators]).to(device)
            self.k = 0
        self.k += 1
        return self.u_B_K[:, self.k - 1 : self.k]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        s_B_V = self.warpers(input_ids, scores.float())
        if s_B_V.shape[0] != len(self.generators):
            raise ValueError(f"RowSampling got {s_B_V.shape[0]} rows for {len(self.generators)} row streams")
        cdf_B_V = torch.softmax(s_B_V, dim=-1).double().cumsum(dim=-1)
        x_B1 = self._uniforms(cdf_B_V.device) * cdf_B_V[:, -1:]
        token_B1 = torch.searchsorted(cdf_B_V, x_B1, right=True).clamp(max=s_B_V.shape[1] - 1)
        return torch.full_like(s_B_V, float("-inf")).scatter_(1, token_B1, 0.0)


class HFSampler:
    """Samples with ``model.generate`` (KV cache), in chunks of ``batch_size`` rows (None: all rows at once).

    The ``hf`` rollout engine (``esr.rollout.engine.Sampler``). With ``sampling_copy`` None (``rollout.dtype=auto``)
    it samples with the trainer's own module, so it always sees the current weights at no cost; with a
    ``SamplingCopy`` (another ``rollout.dtype``) it samples with the copy, which ``sync_weights`` refreshes. It gives
    no log-probs of its own (``Rollouts.logprobs_B_R`` is None).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        temperature: float = 0.7,
        top_p: float = 1.0,
        min_new_tokens: int = 0,
        batch_size: int | None = None,
        synced: bool = False,
        sampling_copy: SamplingCopy | None = None,
    ) -> None:
        self.copy = sampling_copy
        self.model = model if sampling_copy is None else sampling_copy.module
        """The module ``generate`` runs on: the trained one, or the sample-dtype copy (esr.rollout.sampling_copy)."""
        self.synced = synced
        """``generate(synced_gpus=True)``: every process steps until all are done (sharded layers, esr.train.fsdp)."""
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.temperature = temperature
        self.top_p = top_p
        self.min_new_tokens = min_new_tokens
        self.batch_size = batch_size

    def sync_weights(self, model: PreTrainedModel) -> None:
        """Without a copy, nothing to do: ``self.model`` is the trained module itself (or, wrapped for training,
        shares its parameters), so every step samples from the current weights. With one, write ``model``'s current
        weights into it."""
        if self.copy is not None:
            self.copy.refresh(model)

    def close(self) -> None:
        """Nothing to free: the module is the trainer's (a copy goes with the sampler)."""

    def generation_config(self, max_new_tokens: int, prompt_len: int = 0) -> GenerationConfig:
        """Greedy ``generate`` with no warpers of HF's own (top-k off, no repetition penalty): sampling at
        ``temperature`` with ``top_p`` is ``RowSampling``'s job, added by ``sample``. (``prompt_len``, the padded
        prompt columns, sizes a static cache in ``esr.rollout.compiled``; unused here.)"""
        return GenerationConfig(
            do_sample=False,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            repetition_penalty=1.0,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min(self.min_new_tokens, max_new_tokens),
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )

    def padded_prompts(self, prompt_ids: Sequence[Sequence[int]], pad_to: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, P) left-padded ids and mask, P = max(longest prompt, ``pad_to``)."""
        ids_B_P, mask_B_P = left_pad(prompt_ids, self.pad_token_id)
        if pad_to > ids_B_P.shape[1]:
            extra = pad_to - ids_B_P.shape[1]
            ids_B_P = torch.nn.functional.pad(ids_B_P, (extra, 0), value=self.pad_token_id)
            mask_B_P = torch.nn.functional.pad(mask_B_P, (extra, 0), value=0)
        return ids_B_P, mask_B_P

    def generate_rows(self, ids_B_P: torch.Tensor, mask_B_P: torch.Tensor, rows: Sequence[int], seed: int,
                      gen_config: GenerationConfig) -> torch.Tensor:
        """One chunk's new tokens (B, R) on the CPU, row b's noise keyed by (seed, rows[b])."""
        device = next(self.model.parameters()).device
        processors = LogitsProcessorList([RowSampling(self.temperature, self.top_p, seed, rows)]
                                         if self.temperature > 0 else [])
        out_B_L = self.model.generate(input_ids=ids_B_P.to(device), attention_mask=mask_B_P.to(device),
                                      generation_config=gen_config, logits_processor=processors,
                                      synced_gpus=self.synced)
        return out_B_L[:, ids_B_P.shape[1] :].cpu()

    @torch.no_grad()
    def sample(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, *, seed: int,
               row_ids: Sequence[int] | None = None, pad_to: int = 0) -> Rollouts:
        """One response per prompt; prompts are left-padded to max(longest prompt, ``pad_to``) columns.

        ``row_ids[b]`` (default b) keys row b's noise: the same (seed, row id, prompt) gives the same response
        whatever the other rows are (module docstring). A process sampling a shard of a batch passes the rows'
        indices in the whole batch, and that batch's longest prompt as ``pad_to``.
        """
        row_ids = list(range(len(prompt_ids))) if row_ids is None else list(row_ids)
        if len(row_ids) != len(prompt_ids):
            raise ValueError(f"sample: {len(row_ids)} row ids for {len(prompt_ids)} prompts")
        ids_B_P, mask_B_P = self.padded_prompts(prompt_ids, pad_to)
        chunk = self.batch_size or len(prompt_ids)
        gen_config = self.generation_config(max_new_tokens, prompt_len=ids_B_P.shape[1])
        was_training = self.model.training
        self.model.eval()
        # Noise streams seeded here, per row (not once per run): a step's samples are a function of (seed, step),
        # so a resumed run samples the same; the global RNG is never touched.
        pieces = [self.generate_rows(ids_B_P[a : a + chunk], mask_B_P[a : a + chunk], row_ids[a : a + chunk], seed,
                                     gen_config) for a in range(0, len(prompt_ids), chunk)]
        self.model.train(was_training)
        R = max(p.shape[1] for p in pieces)
        new_B_R = torch.cat([torch.nn.functional.pad(p, (0, R - p.shape[1]), value=self.pad_token_id) for p in pieces])
        return build_rollouts(ids_B_P, mask_B_P, new_B_R, self.eos_token_ids, max_new_tokens)
