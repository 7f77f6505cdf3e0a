"""Render a Document as GitHub markdown, with its PNGs written to a folder beside the ``.md`` file."""

from __future__ import annotations

import re
from pathlib import Path

from esr.report.doc import Block, Bullets, Document, Heading, Image, Table, Text


def _escape(text: str) -> str:
    """Text safe inside a markdown table cell or paragraph (pipes, markup characters, line breaks)."""
    text = re.sub(r"([\\`*\[\]<>|])", r"\\\1", text)
    return " ".join(text.split())


def _table(t: Table) -> str:
    """A GitHub table; numeric columns right-aligned."""
    numeric = t.numeric_columns()
    lines = ["| " + " | ".join(_escape(c) or " " for c in t.columns) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_escape(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def _file_name(name: str, taken: set[str]) -> str:
    """A safe, unique PNG file name for an image."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "figure"
    candidate, i = f"{stem}.png", 2
    while candidate in taken:
        candidate, i = f"{stem}-{i}.png", i + 1
    taken.add(candidate)
    return candidate


def _block(b: Block, assets: Path, taken: set[str]) -> str:
    """One block as markdown; an Image is written into ``assets`` and linked relative to the markdown file."""
    if isinstance(b, Heading):
        return "#" * b.level + " " + b.text
    if isinstance(b, Text):
        text = _escape(b.text)
        return f"> **Warning:** {text}" if b.tone == "warn" else f"_{text}_" if b.tone == "muted" else text
    if isinstance(b, Bullets):
        prefix = "- ⚠ " if b.tone == "warn" else "- "
        return "\n".join(prefix + _escape(item) for item in b.items)
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Image):
        file_name = _file_name(b.name, taken)
        assets.mkdir(parents=True, exist_ok=True)
        (assets / file_name).write_bytes(b.png)
        caption = f"\n\n_{_escape(b.caption)}_" if b.caption else ""
        return f"![{_escape(b.alt)}]({assets.name}/{file_name}){caption}"
    raise TypeError(f"unknown block {type(b).__name__}")


def assets_folder(md_path: Path) -> Path:
    """Where the PNGs of ``report.md`` go: ``report_files/`` beside it."""
    return md_path.with_name(f"{md_path.stem}_files")


def render_markdown(doc: Document, md_path: Path) -> str:
    """The whole document as markdown; writes its PNGs into ``assets_folder(md_path)``."""
    assets, taken = assets_folder(md_path), set()
    parts = [f"# {doc.title}", f"_{_escape(doc.subtitle)}_"]
    parts += [_block(b, assets, taken) for b in doc.blocks]
    return "\n\n".join(parts) + "\n"
