"""The samples table (``log.samples_every``): a step's first rollouts as text, for a person to read next to the
numbers. One row per rollout: the prompt, the response, its length in tokens, its mean KL per trained token
(the step's KL metric, summed over the row's selected tokens / their count; 0 when none was selected) and whether
the horizon cut it."""

from __future__ import annotations

from typing import Any

import torch

from esr.types import Rollouts


def sample_rows(tokenizer: Any, rollouts: Rollouts, kl_sum_B: torch.Tensor, selected_B: torch.Tensor,
                limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` rollouts of ``rollouts`` as table rows (prompt and response decoded without padding or
    special tokens)."""
    rows = []
    response_B_R = rollouts.response_ids_B_R
    for b in range(min(limit, len(rollouts))):
        prompt = rollouts.input_ids_B_L[b, : rollouts.prompt_len][rollouts.attention_mask_B_L[b, : rollouts.prompt_len]
                                                                  .bool()]
        response = response_B_R[b][rollouts.response_mask_B_R[b].bool()]
        n = int(selected_B[b])
        rows.append({
            "prompt": tokenizer.decode(prompt.tolist(), skip_special_tokens=True),
            "response": tokenizer.decode(response.tolist(), skip_special_tokens=True),
            "length": int(rollouts.lengths_B[b]),
            "kl": float(kl_sum_B[b]) / n if n else 0.0,
            "cut": bool(rollouts.cut_B[b]),
        })
    return rows
