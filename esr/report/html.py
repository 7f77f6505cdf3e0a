"""Render a Document as one self-contained HTML file: inline CSS, PNGs as data URIs, no scripts, no links out.

It reads the same from disk as from a server and follows the reader's light or dark colour scheme; plots sit on
white cards so they stay legible in both.
"""

from __future__ import annotations

import base64
from html import escape

from esr.report.doc import Block, Bullets, Document, Heading, Image, Table, Text

CSS = """
:root { color-scheme: light dark; --bg: #ffffff; --fg: #1f2328; --muted: #59636e; --border: #d1d9e0;
  --stripe: #f6f8fa; --head: #eef1f4; --warn-bg: #fff8c5; --warn-fg: #6a4b00; --accent: #0969da; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #0d1117; --fg: #e6edf3; --muted: #9198a1; --border: #3d444d; --stripe: #151b23; --head: #1c232c;
    --warn-bg: #3a2d00; --warn-fg: #f2cc60; --accent: #4493f8; } }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 2rem 1.25rem 4rem; }
h1 { font-size: 1.7rem; margin: 0 0 .2rem; letter-spacing: -.01em; }
h2 { font-size: 1.25rem; margin: 2.4rem 0 .8rem; padding-bottom: .3rem; border-bottom: 1px solid var(--border); }
h3 { font-size: 1.02rem; margin: 1.6rem 0 .5rem; }
p { margin: .5rem 0; }
.subtitle, .muted { color: var(--muted); }
.subtitle { margin-bottom: 1.5rem; font-size: .92rem; }
.warn { background: var(--warn-bg); color: var(--warn-fg); border-radius: 6px; padding: .5rem .8rem; }
ul.warn { padding-left: 1.8rem; }
ul.muted { font-size: .85rem; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.table-wrap { overflow-x: auto; margin: .6rem 0 1rem; border: 1px solid var(--border); border-radius: 8px; }
table { border-collapse: collapse; width: 100%; font-size: .88rem; font-variant-numeric: tabular-nums; }
th, td { padding: .38rem .7rem; text-align: left; vertical-align: top; border-bottom: 1px solid var(--border); }
th { background: var(--head); font-weight: 600; white-space: nowrap; }
tr:last-child td { border-bottom: none; }
tbody tr:nth-child(even) td { background: var(--stripe); }
td.num, th.num { text-align: right; white-space: nowrap; }
.swatch { display: inline-block; width: .8em; height: .8em; border-radius: 3px; margin-right: .45em;
  vertical-align: -.05em; }
figure { margin: 1rem 0 1.4rem; }
figure img { display: block; max-width: 100%; height: auto; background: #fff; border: 1px solid var(--border);
  border-radius: 8px; padding: 6px; }
figcaption { color: var(--muted); font-size: .85rem; margin-top: .35rem; }
"""


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(t: Table) -> str:
    """A table with right-aligned numeric columns and a colour swatch before each row's first cell."""
    numeric = t.numeric_columns()
    head = "".join(f'<th{" class=num" if numeric[j] else ""}>{escape(c)}</th>' for j, c in enumerate(t.columns))
    body = []
    for i, row in enumerate(t.rows):
        cells = []
        for j, value in enumerate(row):
            swatch = ""
            if j == 0 and t.swatches and t.swatches[i]:
                swatch = f'<span class="swatch" style="background:{escape(t.swatches[i])}"></span>'
            cells.append(f'<td{" class=num" if numeric[j] else ""}>{swatch}{escape(value)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _block(b: Block) -> str:
    """One block as HTML."""
    if isinstance(b, Heading):
        return f"<h{b.level}>{escape(b.text)}</h{b.level}>"
    if isinstance(b, Text):
        return f'<p class="{b.tone}">{escape(b.text)}</p>'
    if isinstance(b, Bullets):
        return f'<ul class="{b.tone}">' + "".join(f"<li>{escape(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Table):
        return _table(b)
    if isinstance(b, Image):
        caption = f"<figcaption>{escape(b.caption)}</figcaption>" if b.caption else ""
        return f'<figure><img src="{data_uri(b.png)}" alt="{escape(b.alt)}">{caption}</figure>'
    raise TypeError(f"unknown block {type(b).__name__}")


def render_html(doc: Document) -> str:
    """The whole document as one HTML page."""
    body = "\n".join(_block(b) for b in doc.blocks)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{escape(doc.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{escape(doc.title)}</h1>\n<p class=\"subtitle\">{escape(doc.subtitle)}</p>\n{body}\n"
        "</main>\n</body>\n</html>\n"
    )
