"""A data mixture (``data.mix``): several prompt sources, each with a weight, read into one prompt list, and the
rows each training step takes from each source.

    mix = load_mix(cfg.data, tokenizer, max_tokens)     # every source's prompts, concatenated in mix order
    index = mix_batch_indices(mix.sizes, mix.weights, batch_size, step, seed)   # global prompt indices

Which source fills a row is a fixed, deterministic sequence over the run's rows (position p = step * B + b): each
row goes to the source furthest behind its share,

    source(p) = argmax_j [ (p + 1) w_j - c_j(p) ]      (w_j = weight_j / sum weight; c_j(p): rows of j before p;
                                                        ties to the first item)

so after any P rows every source holds within one row of P w_j: each batch carries the weights' proportions (up to
rounding), not a random draw of them. Within a source the rows walk per-epoch permutations of its prompts, seeded by
``(seed, item)``, as ``esr.data.order.batch_indices`` walks one source. Both are pure functions of (step, seed), so
a resumed run draws the same rows.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from esr.config import DataConfig, MixSource
from esr.config.checks import mix_name
from esr.data.order import epoch_order
from esr.data.sources import PromptSet, load_prompts
from esr.data.template import TokenizedPrompts, tokenize_prompts


@dataclass(frozen=True)
class MixPrompts:
    """Every source's usable prompts, concatenated in ``data.mix`` order."""

    tokenized: TokenizedPrompts
    """All sources' prompts and ids (source j's are [offsets[j], offsets[j] + sizes[j]))."""
    names: tuple[str, ...]
    """Each source's name (``mix_name``), as metrics and run.json show it."""
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    """Normalised: they sum to 1."""
    info: dict[str, dict[str, Any]]
    """run.json's account per source: where it came from, rows read and skipped, prompts kept, weight."""

    def source_of(self, index: int) -> int:
        """The mix item that global prompt ``index`` came from."""
        return bisect.bisect_right(self.offsets, index) - 1


def item_config(data: DataConfig, item: MixSource) -> DataConfig:
    """The one-source ``DataConfig`` of mix ``item``: its own fields, ``data``'s where it leaves them None."""
    return dataclasses.replace(
        data, source=item.source, path=item.path, mix=(),
        split=data.split if item.split is None else item.split, size=item.size or data.size,
        limit=data.limit if item.limit is None else item.limit,
        instruction=data.instruction if item.instruction is None else item.instruction,
    )


def load_mix(data: DataConfig, tokenizer: Any, max_tokens: int) -> MixPrompts:
    """Read and tokenise every ``data.mix`` source (each as ``load_prompts`` and ``tokenize_prompts`` read one
    source: malformed rows skipped and counted, too-long prompts dropped and counted)."""
    sets: list[PromptSet] = [load_prompts(item_config(data, item)) for item in data.mix]
    parts = [tokenize_prompts(ps.prompts, tokenizer, max_tokens) for ps in sets]
    sizes = tuple(len(p.ids) for p in parts)
    offsets = tuple(sum(sizes[:j]) for j in range(len(sizes)))
    total = sum(item.weight for item in data.mix)
    weights = tuple(item.weight / total for item in data.mix)
    names = tuple(mix_name(item) for item in data.mix)
    tokenized = TokenizedPrompts(
        prompts=tuple(p for part in parts for p in part.prompts), ids=tuple(i for part in parts for i in part.ids),
        n_too_long=sum(p.n_too_long for p in parts), n_empty=sum(p.n_empty for p in parts))
    info = {name: {"source": ps.source, "weight": w, "data_rows": ps.n_rows, "data_skipped": ps.n_skipped,
                   "prompts": n, "prompts_too_long": part.n_too_long}
            for name, ps, part, n, w in zip(names, sets, parts, sizes, weights, strict=True)}
    return MixPrompts(tokenized, names, offsets, sizes, weights, info)


def mix_batch_indices(sizes: Sequence[int], weights: Sequence[float], batch_size: int, step: int,
                      seed: int) -> list[int]:
    """Global prompt indices of 0-based ``step``'s batch (module docstring): row b is position step * B + b of the
    source sequence, and the next unused row of its source's permutation stream."""
    start, stop = step * batch_size, (step + 1) * batch_size
    order = _source_sequence(tuple(weights), stop)
    seen = [order[:start].count(j) for j in range(len(sizes))]
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    out = []
    for p in range(start, stop):
        j = order[p]
        epoch, i = divmod(seen[j], sizes[j])
        out.append(offsets[j] + epoch_order(sizes[j], seed * 7919 + j + 1, epoch)[i])
        seen[j] += 1
    return out


_SEQUENCES: dict[tuple[float, ...], list[int]] = {}


def _source_sequence(weights: tuple[float, ...], n: int) -> list[int]:
    """The first ``n`` positions' sources (module docstring), extended and cached per weights (a resumed run
    computes the prefix again: one pass over the rows so far)."""
    seq = _SEQUENCES.setdefault(weights, [])
    counts = [seq.count(j) for j in range(len(weights))] if len(seq) < n else []
    for p in range(len(seq), n):
        j = max(range(len(weights)), key=lambda k: (p + 1) * weights[k] - counts[k])
        seq.append(j)
        counts[j] += 1
    return seq[:n]

