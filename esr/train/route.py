"""Several teachers (``data.mix`` items with their own ``teacher``): which teacher scores which row.

The session builds one scorer per distinct teacher (``teacher_configs``: the first item's first) and a ``Route``:
each source's prompts, weight, scorer and logit columns. A step (``esr.train.run_step``) then

    index  = route.prompt_indices(B, step, seed)     # the mix's rows of the step (esr.data.mix)
    groups = route.groups(index)                      # [(source j, its rows of the batch), ...], sources with rows

and reads, scores and trains each group with its own scorer, every group's loss divided by the WHOLE batch's
selected-token count n_total, so the gradient is the token mean over the batch that one teacher's batch would give:

    L = sum_g sum_{t in g} l_t / n_total,      n_total = sum_g n_g

A source with no rows in the batch costs nothing: its teacher does not run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from esr.config import Config
from esr.data.mix import MixPrompts, mix_batch_indices
from esr.teacher.scorer import TeacherScorer


def teacher_configs(cfg: Config) -> list[Config]:
    """One config per distinct teacher the run needs, ``teacher`` set to it: ``[cfg]`` for one source, else the
    mix items' teachers (an item without one: the top-level teacher) in order of first use."""
    if not cfg.data.mix:
        return [cfg]
    teachers = list(dict.fromkeys(item.teacher or cfg.teacher for item in cfg.data.mix))
    return [cfg if t == cfg.teacher else dataclasses.replace(cfg, teacher=t) for t in teachers]


@dataclass(frozen=True)
class Route:
    """A data mix's sources and the scorer of each (module docstring)."""

    mix: MixPrompts
    scorers: tuple[TeacherScorer, ...]
    """Per source (sources that share a teacher share its scorer)."""
    vocab_sizes: tuple[int, ...]
    """Per source: the student's logit columns its teacher's loss uses."""
    teacher_params: tuple[int, ...]
    """Per source: its teacher's parameter count (for ``flops_score``; 0 where a server does not say)."""
    info: dict[str, Any]
    """run.json's ``mix``: the teachers and each source's weight, teacher and prompt counts."""

    def prompt_indices(self, batch_size: int, step: int, seed: int) -> list[int]:
        """Global prompt indices of 0-based ``step`` (``esr.data.mix.mix_batch_indices``)."""
        return mix_batch_indices(self.mix.sizes, self.mix.weights, batch_size, step, seed)

    def groups(self, prompt_index: Sequence[int]) -> list[tuple[int, list[int]]]:
        """(source, the batch rows whose prompt comes from it) for every source with rows, in mix order."""
        by_source: dict[int, list[int]] = {}
        for row, index in enumerate(prompt_index):
            by_source.setdefault(self.mix.source_of(index), []).append(row)
        return sorted(by_source.items())

    def all_scorers(self) -> list[TeacherScorer]:
        """The distinct scorers (to close when the run ends)."""
        return list({id(s): s for s in self.scorers}.values())


def make_route(cfg: Config, cfgs: Sequence[Config], scorers: Sequence[TeacherScorer], vocab_sizes: Sequence[int],
               teacher_params: Sequence[int], mix: MixPrompts) -> Route:
    """The route of ``cfg.data.mix``, given the scorer, vocabulary and parameter count of each of
    ``teacher_configs(cfg)``."""
    which = [[c.teacher for c in cfgs].index(item.teacher or cfg.teacher) for item in cfg.data.mix]
    sources = {name: {**mix.info[name], "teacher": cfgs[t].teacher.name} for name, t in zip(mix.names, which,
                                                                                            strict=True)}
    info = {"teachers": [c.teacher.name for c in cfgs], "sources": sources}
    return Route(mix, tuple(scorers[t] for t in which), tuple(vocab_sizes[t] for t in which),
                 tuple(teacher_params[t] for t in which), info)
