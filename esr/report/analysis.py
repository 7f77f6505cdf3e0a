"""Probe and analysis outputs (analysis/*.json, kl_profile.json, decay.json, their PNGs), rendered generically.

Their schemas are still moving, so nothing here knows them: top-level scalars (and those of nested objects, as
dotted keys) become a key/value table, lists of objects (and objects of same-shaped objects) become tables with a
capped number of rows and columns, and PNGs beside a JSON file (same folder, name starting with its stem) are shown
under it; other PNGs are shown on their own. An analysis that writes its own markdown summary beside its JSON
(``modes.md`` beside ``modes.json``) is shown as that summary instead: its tables and paragraphs, as written.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esr.report.collect import ReportError
from esr.report.doc import Block, Heading, Image, Table, Text
from esr.report.fmt import cell

TOP_LEVEL_STEMS = ("kl_profile", "decay")
"""Analysis outputs that may sit at the top of a run folder (everything under analysis/ is picked up too)."""
ROW_CAP, COLUMN_CAP, KEY_CAP = 25, 12, 60


@dataclass(frozen=True)
class AnalysisItem:
    """One JSON output with the PNGs beside it, or a PNG on its own (``data`` None, ``path`` the PNG)."""

    path: Path
    label: str
    data: Any = None
    error: str | None = None
    images: tuple[Path, ...] = ()
    summary_md: str | None = None  # the analysis's own markdown twin (<stem>.md beside the JSON), when it wrote one


def discover(run_dir: Path) -> list[AnalysisItem]:
    """The analysis outputs inside a run folder: everything under analysis/, and kl_profile / decay at the top."""
    jsons: list[Path] = []
    pngs: list[Path] = []
    folder = run_dir / "analysis"
    if folder.is_dir():
        jsons += sorted(folder.rglob("*.json"))
        pngs += sorted(folder.rglob("*.png"))
    for stem in TOP_LEVEL_STEMS:
        jsons += [p for p in [run_dir / f"{stem}.json"] if p.is_file()]
        pngs += sorted(run_dir.glob(f"{stem}*.png"))
    return _pair(jsons, pngs, run_dir)


def discover_paths(paths: Sequence[Path]) -> list[AnalysisItem]:
    """Analysis outputs given explicitly: JSON or PNG files (a JSON's PNGs come along), or folders of them."""
    jsons: list[Path] = []
    pngs: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            jsons += sorted(p.rglob("*.json"))
            pngs += sorted(p.rglob("*.png"))
        elif p.is_file() and p.suffix == ".json":
            jsons.append(p)
            pngs += sorted(p.parent.glob(f"{p.stem}*.png"))
        elif p.is_file() and p.suffix == ".png":
            pngs.append(p)
        else:
            raise ReportError(f"analysis output {p} is not a JSON or PNG file or a folder of them")
    return _pair(list(dict.fromkeys(jsons)), list(dict.fromkeys(pngs)), None)


def _pair(jsons: list[Path], pngs: list[Path], base: Path | None) -> list[AnalysisItem]:
    """Attach each PNG to the JSON in its folder with the longest stem it starts with; the rest stand alone."""
    owned: dict[Path, list[Path]] = {j: [] for j in jsons}
    loose: list[Path] = []
    for png in pngs:
        owners = [j for j in jsons if j.parent == png.parent and png.stem.startswith(j.stem)]
        if owners:
            owned[max(owners, key=lambda j: len(j.stem))].append(png)
        else:
            loose.append(png)
    items = [_load(j, _label(j, base), tuple(images)) for j, images in owned.items()]
    return items + [AnalysisItem(path=p, label=_label(p, base)) for p in loose]


def _label(path: Path, base: Path | None) -> str:
    """The path relative to the run folder (or the full path for explicit outputs)."""
    if base is not None and path.is_relative_to(base):
        return str(path.relative_to(base))
    return str(path)


def _load(path: Path, label: str, images: tuple[Path, ...]) -> AnalysisItem:
    """Read one JSON output; an unreadable one is kept with its error so the report says so."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return AnalysisItem(path=path, label=label, error=f"could not read {label}: {e}", images=images)
    twin = path.with_suffix(".md")
    summary_md = twin.read_text(encoding="utf-8") if twin.is_file() else None
    return AnalysisItem(path=path, label=label, data=data, images=images, summary_md=summary_md)


def _is_records(value: Any) -> bool:
    """A non-empty list of objects (a table)."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _is_keyed_records(value: Any) -> bool:
    """An object of at least two objects with the same keys ({"esr": {...}, "full": {...}}): a table by key."""
    if not isinstance(value, dict) or len(value) < 2 or not all(isinstance(v, dict) and v for v in value.values()):
        return False
    keys = [set(v) for v in value.values()]
    return all(k == keys[0] for k in keys)


def flatten(data: Any, prefix: str = "", depth: int = 0) -> tuple[list[tuple[str, Any]], list[tuple[str, list]]]:
    """Split a JSON value into (dotted key, scalar-ish value) pairs and (dotted key, list of row objects) tables."""
    scalars: list[tuple[str, Any]] = []
    tables: list[tuple[str, list]] = []
    if _is_records(data):
        return scalars, [(prefix.rstrip(".") or "rows", data)]
    if _is_keyed_records(data):
        return scalars, [(prefix.rstrip(".") or "rows", [{"": k, **v} for k, v in data.items()])]
    if not isinstance(data, dict):
        return [(prefix.rstrip(".") or "value", data)], tables
    for key, value in data.items():
        name = f"{prefix}{key}"
        if _is_records(value) or _is_keyed_records(value) or (isinstance(value, dict) and depth < 2):
            s, t = flatten(value, f"{name}.", depth + 1)
            scalars += s
            tables += t
        else:
            scalars.append((name, value))
    return scalars, tables


def records_table(rows: list[dict[str, Any]]) -> tuple[Table, str | None]:
    """A table of the first ROW_CAP rows and COLUMN_CAP columns, and a note of what was left out (or None)."""
    columns: list[str] = list(dict.fromkeys(k for r in rows for k in r))
    shown_columns, shown_rows = columns[:COLUMN_CAP], rows[:ROW_CAP]
    table = Table(columns=[c or "key" for c in shown_columns],
                  rows=[[cell(r.get(c), 40) if c in r else "" for c in shown_columns] for r in shown_rows])
    cut = []
    if len(rows) > ROW_CAP:
        cut.append(f"first {ROW_CAP} of {len(rows)} rows")
    if len(columns) > COLUMN_CAP:
        cut.append(f"first {COLUMN_CAP} of {len(columns)} columns")
    return table, ("showing " + " and ".join(cut)) if cut else None


def _plain(text: str) -> str:
    """Markdown inline text as plain text: emphasis and code marks dropped (the renderers escape the rest)."""
    return text.replace("**", "").replace("`", "").strip()


def markdown_blocks(md: str) -> list[Block]:
    """The blocks of an analysis's markdown summary: pipe tables become Tables, headings and paragraphs Texts."""
    blocks: list[Block] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [_plain(c) for c in lines[i].strip().strip("|").split("|")]
                if not all(set(c) <= set(":-") and c for c in cells):  # not the |---|---:| separator
                    rows.append(cells)
                i += 1
            width = len(rows[0])  # a ragged row is padded or cut to the header's width
            blocks.append(Table(columns=rows[0], rows=[(r + [""] * width)[:width] for r in rows[1:]]))
            continue
        paragraph = []
        while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith("|"):
            paragraph.append(lines[i].strip().lstrip("#").strip())
            i += 1
        if paragraph:
            blocks.append(Text(_plain(" ".join(paragraph))))
        else:
            i += 1
    return blocks


def render(item: AnalysisItem, heading: str, image_prefix: str) -> list[Block]:
    """The blocks of one analysis output: heading, then its own markdown summary if it wrote one, else its scalars
    and tables; then its images."""
    blocks: list[Block] = [Heading(3, heading)]
    if item.error:
        blocks.append(Text(item.error, tone="warn"))
    if item.summary_md is not None:
        blocks += [*markdown_blocks(item.summary_md),
                   Text(f"(the summary {item.path.stem}.md written beside {item.path.name}, which has every number)",
                        tone="muted")]
    elif item.data is not None:
        scalars, tables = flatten(item.data)
        if scalars:
            blocks.append(Table(columns=["field", "value"], rows=[[k, cell(v)] for k, v in scalars[:KEY_CAP]]))
            if len(scalars) > KEY_CAP:
                blocks.append(Text(f"showing the first {KEY_CAP} of {len(scalars)} fields", tone="muted"))
        for key, rows in tables:
            table, note = records_table(rows)
            blocks += [Text(f"{key} ({len(rows)} rows{'; ' + note if note else ''})", tone="muted"), table]
    pngs = (item.path,) if item.path.suffix == ".png" else item.images
    for png in pngs:
        blocks.append(Image(name=f"{image_prefix}-{png.stem}", png=png.read_bytes(), alt=f"{heading}: {png.name}",
                            caption=png.name))
    return blocks
