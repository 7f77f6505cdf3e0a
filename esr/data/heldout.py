"""Held-out prompts of a run: prompts its training never drew, rendered and tokenised as in training.

For ``gsm_symbolic`` the run's generator with another seed (``HELDOUT_SEED``, or ``data.seed + 1`` when the run
trained on that seed), i.e. fresh problems; for file and hub sources the LAST prompts of the set that the run's
training batches never drew (``batch_indices`` over its steps), topped up with the last drawn ones, with a
warning, when training visited almost every prompt.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from esr.config import Config
from esr.data.order import step_prompts
from esr.data.sources import Prompt, load_prompts
from esr.data.template import tokenize_prompts

log = logging.getLogger("esr.data")

HELDOUT_SEED = 1_000_003
"""gsm_symbolic seed of the held-out problems (the same generator seed ``esr eval`` uses, apart from training's)."""


@dataclass(frozen=True)
class HeldOutPrompts:
    prompt_ids: tuple[tuple[int, ...], ...]
    ids: tuple[str, ...]
    """The prompts' source ids (``gsm_symbolic:<seed>:<index>``, ``<file>:<line>``, ...)."""
    how: str
    """How they were chosen, for the report."""
    prompts: tuple[Prompt, ...] = ()
    """The prompts themselves (to render them for another tokenizer)."""


def heldout_prompts(cfg: Config, tokenizer: Any, n: int, others: Sequence[Config] = ()) -> HeldOutPrompts:
    """``n`` prompts the run did not train on, rendered and tokenised as in training (module docstring). With
    ``others`` (runs of the same data), file and hub prompts that any of those runs drew are left out too, so several
    runs are measured on prompts none of them trained on."""
    data = cfg.data
    if data.source == "gsm_symbolic":
        seed = HELDOUT_SEED if data.seed != HELDOUT_SEED else data.seed + 1
        held = dataclasses.replace(data, seed=seed, size=n, limit=None)
        tok = tokenize_prompts(load_prompts(held).prompts, tokenizer, data.max_prompt_tokens)
        how = f"gsm_symbolic generator seed {seed} (training used seed {data.seed}): first {len(tok.ids)} problems"
        return HeldOutPrompts(tok.ids[:n], tuple(p.id for p in tok.prompts[:n]), how, tuple(tok.prompts[:n]))
    tok = tokenize_prompts(load_prompts(data).prompts, tokenizer, data.max_prompt_tokens)
    total = len(tok.ids)
    drawn = {i for run in (cfg, *others) for step in range(run.train.steps)
             for i in step_prompts(total, run.train.batch_size, step, run.seed, run.rollout.samples_per_prompt)}
    unseen = [i for i in range(total) if i not in drawn]
    chosen = unseen[-n:]
    if len(chosen) < n:
        log.warning("only %d of %d prompts were never drawn in training; adding %d drawn ones", len(unseen), total,
                    min(n, total) - len(chosen))
        chosen = sorted(chosen + [i for i in range(total) if i in drawn][-(n - len(chosen)):])
    runs = f"the run's {cfg.train.steps} steps" if not others else f"the training steps of {1 + len(others)} runs"
    how = f"last {len(chosen)} of the {total} prompts of {data.source} never drawn by {runs}"
    return HeldOutPrompts(tuple(tok.ids[i] for i in chosen), tuple(tok.prompts[i].id for i in chosen), how,
                          tuple(tok.prompts[i] for i in chosen))
