"""The range of every numeric config field, declared beside the field, and the one check that enforces them.

A numeric field of the schema is declared with ``ranged(default, RANGE)``::

    lr: float = ranged(5e-5, POSITIVE)            # a finite number > 0
    steps: int = ranged(200, at_least(1))         # a count
    top_p: float = ranged(1.0, between(0, 1, lo_open=True))   # (0, 1]

Every float must be finite (nan and inf are refused everywhere: no field means anything by them); an ``int`` field
must hold an int (not a bool, not a float); ``None`` passes where the annotation allows it. ``check_ranges`` walks a
config tree and raises ``ConfigError`` naming the dotted key, the range and the value, e.g. ``train.lr must be a
finite number > 0, got nan``. ``Config.__post_init__`` runs it before the cross-field checks, so YAML, overrides and
a ``Config(...)`` built in code are all checked before anything loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from esr.config.checks import ConfigError

SEED_MAX = 2**32 - 1
"""Largest seed: seeds are mixed into 64-bit generator seeds (``seed * 1_000_003 + step``), which must not overflow."""


@dataclass(frozen=True)
class Range:
    """Where a numeric value may lie: from ``lo`` to ``hi``, each end closed (included) or open, or absent
    (unbounded). Always finite."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: float) -> bool:
        if not math.isfinite(x):
            return False
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def describe(self, integer: bool) -> str:
        """The range in words: ``at least 1`` (a count), ``a finite number > 0``, ``a finite number in (0, 1]``."""
        if self.hi is None and self.lo is not None:
            if integer and not self.lo_open:
                return f"at least {_num(self.lo)}"
            bound = f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None and self.lo is None:
            bound = f"{'<' if self.hi_open else '<='} {_num(self.hi)}"
        elif self.hi is not None and self.lo is not None:
            bound = f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"
        else:
            bound = ""
        return f"{'an integer' if integer else 'a finite number'} {bound}".rstrip()


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


POSITIVE = Range(0, lo_open=True)
"""> 0 (a learning rate, a temperature, a timeout)."""
NON_NEGATIVE = Range(0)
""">= 0 (0 usually means off: no weight decay, no clipping, no warm-up)."""
PROBABILITY = Range(0, 1)
"""[0, 1]."""
SEED = Range(0, SEED_MAX)
"""[0, 2**32 - 1]."""
COUNT = Range(1)
""">= 1 (for command-line options; in the schema ``at_least(1)`` says it where the field is declared)."""
SHARE = Range(0, 1, lo_open=True)
"""(0, 1]: a share of something that must not be empty (top-p mass, a share of the KL)."""


def at_least(n: int) -> Range:
    """>= n: a count (``at_least(1)``) or a count that may be 0 (``at_least(0)``)."""
    return Range(n)


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Range:
    """From ``lo`` to ``hi``, both included unless said open."""
    return Range(lo, hi, lo_open, hi_open)


def ranged(default: float | None, allowed: Range) -> Any:
    """A dataclass field with ``default`` whose values must lie in ``allowed`` (``field.metadata["range"]``)."""
    return dataclasses.field(default=default, metadata={"range": allowed})


def field_range(f: dataclasses.Field[Any]) -> Range | None:
    """The range a field declares, or None (a field that is not a number)."""
    return f.metadata.get("range")


@functools.cache
def numeric_kind(cls: type, name: str) -> tuple[type | None, bool]:
    """(int or float or None, whether None is allowed) for field ``name`` of dataclass ``cls``, from its annotation."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    numbers = [a for a in args if a in (int, float)]
    return (numbers[0] if numbers else None), type(None) in args


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Every numeric field of the config tree ``cfg`` inside its declared range; else ``ConfigError`` naming the
    dotted key, the range and the value."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
            continue
        if isinstance(value, tuple) and value and all(dataclasses.is_dataclass(v) for v in value):
            for i, item in enumerate(value):  # a list of sections (data.mix)
                check_ranges(item, f"{key}[{i}].")
            continue
        allowed = field_range(f)
        if allowed is None:
            continue
        kind, optional = numeric_kind(type(cfg), f.name)
        if value is None and optional:
            continue
        integer = kind is int
        wrong_type = isinstance(value, bool) or not isinstance(value, int if integer else (int, float))
        if wrong_type:
            raise ConfigError(f"{key} must be {'an integer' if integer else 'a number'}, got {value!r}")
        if value not in allowed:
            null = " (or null)" if optional else ""
            raise ConfigError(f"{key} must be {allowed.describe(integer)}{null}, got {value}")


def argument(allowed: Range, kind: type[int] | type[float] = int) -> Callable[[str], float]:
    """An argparse ``type=`` for a command-line number: parsed as ``kind`` and refused outside ``allowed``, so
    ``esr eval --limit -3`` is argparse's one-line usage error (exit code 2), not a traceback later."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value not in allowed:
            raise argparse.ArgumentTypeError(f"must be {allowed.describe(kind is int)}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse
