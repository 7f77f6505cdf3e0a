"""Forward passes that stop before the vocabulary projection.

The full logits tensor (B x L x V x 4 bytes) dominates memory in distillation: 4 x 500 x 152k floats is 1.2 GB per
model. So both models run their decoder body only, keep the hidden states of the positions that predict response
tokens (B x R x H, a few MB), and the losses project small time-chunks of them to the vocabulary on demand.
"""

from __future__ import annotations

import torch
from torch import nn

from esr.types import Rollouts


def response_hidden(model: nn.Module, rollouts: Rollouts) -> torch.Tensor:
    """Decoder hidden states at the positions that predict the response tokens: shape (B, R, H).

    Column P - 1 + r predicts response token r (at column P + r), so the last input column is never needed.
    Position ids skip left padding so padded prompts see the same positions as unpadded ones.
    """
    device = next(model.parameters()).device
    P = rollouts.prompt_len
    ids_B_L = rollouts.input_ids_B_L[:, :-1].to(device)
    attn_B_L = rollouts.attention_mask_B_L[:, :-1].to(device)
    pos_B_L = rollouts.position_ids_B_L[:, :-1].to(device)
    decoder = model.get_decoder()
    out = decoder(input_ids=ids_B_L, attention_mask=attn_B_L, position_ids=pos_B_L, use_cache=False)
    return out.last_hidden_state[:, P - 1 :, :]


def head_logits(model: nn.Module, hidden_B_T_H: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Project hidden states to float32 logits (B, T, V), applying the model's final soft-capping if it has one.

    ``vocab_size`` keeps only the first V columns: two models that share a tokenizer may pad their embedding
    matrices to different sizes, and the padding rows are tokens neither can emit.
    """
    head = model.get_output_embeddings()
    logits = head(hidden_B_T_H.to(head.weight.dtype)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    return logits
