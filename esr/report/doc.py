"""The report as data: a title and a list of blocks that the HTML and markdown renderers both draw.

Building the content once and rendering it twice is what keeps ``report.html`` and ``report.md`` the same report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

Tone = Literal["plain", "muted", "warn"]

_NUMERIC = re.compile(r"^[-+]?[\d,]*\.?\d+(e-?\d+)?( ?(s|min|h|GB|%))?$|^—$")


@dataclass(frozen=True)
class Heading:
    """A section (level 2) or subsection (level 3) title."""

    level: int
    text: str


@dataclass(frozen=True)
class Text:
    """A paragraph of plain text (renderers escape it)."""

    text: str
    tone: Tone = "plain"


@dataclass(frozen=True)
class Bullets:
    """A bulleted list of plain-text items."""

    items: list[str]
    tone: Tone = "plain"


@dataclass(frozen=True)
class Table:
    """A table of already formatted cells; ``swatches`` colours the first cell of each row (a run's colour)."""

    columns: list[str]
    rows: list[list[str]]
    swatches: list[str | None] | None = None

    def numeric_columns(self) -> list[bool]:
        """Which columns hold only numbers (right-aligned in HTML and markdown)."""
        flags = []
        for j in range(len(self.columns)):
            cells = [r[j] for r in self.rows if j < len(r) and r[j] not in ("", "—")]
            flags.append(bool(cells) and all(_NUMERIC.match(c) for c in cells))
        return flags


@dataclass(frozen=True)
class Image:
    """A PNG: embedded as a data URI in HTML, written as ``<name>.png`` next to the markdown."""

    name: str
    png: bytes
    alt: str
    caption: str | None = None


Block = Heading | Text | Bullets | Table | Image


@dataclass
class Document:
    """Title, one line under it, and the blocks in reading order."""

    title: str
    subtitle: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block) -> None:
        """Append blocks in order."""
        self.blocks.extend(blocks)
