"""Sample answers from a model, preset or checkpoint: what `esr generate` does."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from esr.data import Prompt, tokenize_prompts
from esr.models import load_model
from esr.rollout.eos import eos_token_ids
from esr.rollout.sampler import left_pad


@torch.no_grad()
def generate_text(
    model_spec: str,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> list[str]:
    """One answer per user message; temperature 0 is greedy. Chat templates are applied as in training."""
    model, tokenizer = load_model(model_spec, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    rows = [Prompt(id=str(i), messages=({"role": "user", "content": p},), answer=None) for i, p in enumerate(prompts)]
    ids = tokenize_prompts(rows, tokenizer, max_tokens=10**9).ids
    pad = tokenizer.pad_token_id  # load_model guarantees one
    ids_B_P, mask_B_P = left_pad(ids, pad)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {
        "do_sample": False}
    torch.manual_seed(seed)
    out_B_L = model.generate(input_ids=ids_B_P, attention_mask=mask_B_P, max_new_tokens=max_new_tokens,
                             pad_token_id=pad, eos_token_id=eos_token_ids(tokenizer, model), **sampling)
    return tokenizer.batch_decode(out_B_L[:, ids_B_P.shape[1]:], skip_special_tokens=True)
