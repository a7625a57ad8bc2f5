"""Writing the report: one document model rendered twice, as Markdown and as one
self-contained HTML file (CSS inline, figures as PNG ``data:`` URIs), with a table of
contents and links to every figure file and the workbook beside it.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

# -- the document model ----------------------------------------------------------------


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    text: str
    """Plain text; `backticks` mark code."""


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    """Cells as text; a newline inside a cell is a line break."""


@dataclass
class Figure:
    stem: str
    """File name without extension, relative to the report folder."""
    caption: str
    formats: Sequence[str] = ("png",)
    """The files written, ``stem.<format>`` each; the first one the Markdown shows."""


@dataclass
class Links:
    """A line of links to files beside the report: (text, relative path)."""

    label: str
    links: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Contents:
    """The table of contents: every level-2 heading, with the figures under it."""


Block = Heading | Paragraph | Bullets | Table | Figure | Links | Contents


def slug(text: str) -> str:
    """A heading's anchor, as GitHub makes it: lower case, punctuation dropped, spaces to
    hyphens (``"Estimated on cluster 10gbe"`` -> ``estimated-on-cluster-10gbe``)."""
    kept = re.sub(r"[^\w\- ]", "", text.lower(), flags=re.UNICODE)
    return kept.strip().replace(" ", "-")


def _outline(blocks: Sequence[Block]) -> list[tuple[Heading, list[Figure]]]:
    out: list[tuple[Heading, list[Figure]]] = []
    for block in blocks:
        if isinstance(block, Heading) and block.level == 2:
            out.append((block, []))
        elif isinstance(block, Figure) and out:
            out[-1][1].append(block)
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


def _md_links(label: str, links: Sequence[tuple[str, str]]) -> str:
    return f"{label}: " + " · ".join(f"[{text}]({path})" for text, path in links)


def _figure_links(figure: Figure) -> list[tuple[str, str]]:
    return [(f.upper(), f"{figure.stem}.{f}") for f in figure.formats]


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Paragraph):
            out.append(block.text)
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Table):
            lines = [
                "| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
                "|" + "|".join("---" for _ in block.headers) + "|",
            ]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("\n".join(lines))
        elif isinstance(block, Figure):
            shown = next((f for f in block.formats if f in ("png", "svg")), None)
            image = f"![{block.caption}]({block.stem}.{shown})\n\n" if shown else ""
            out.append(image + _md_links(block.caption if not shown else "Files", _figure_links(block)))
        elif isinstance(block, Links):
            out.append(_md_links(block.label, block.links))
        elif isinstance(block, Contents):
            entries = []
            for heading, _ in _outline(blocks):
                entries.append(f"- [{heading.text}](#{slug(heading.text)})")
            out.append("\n".join(entries))
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 1280px; margin: 2em auto; padding: 0 1.5em; line-height: 1.5; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
code { background: #f3f3f5; padding: .1em .3em; border-radius: 3px; font-size: 90%; }
nav.toc { background: #f7f7f9; border: 1px solid #e4e4e8; border-radius: 6px; padding: .6em 1.2em;
          display: inline-block; }
nav.toc ul { margin: .2em 0; padding-left: 1.2em; }
nav.toc > ul > li { font-weight: 600; }
nav.toc li li { font-weight: normal; font-size: 14px; }
/* Tables may use the whole window, wider than the text column; past that they scroll. */
.table-wrap { overflow-x: auto; margin: 1em 0; width: calc(100vw - 3em); max-width: 1800px;
              position: relative; left: 50%; transform: translateX(-50%); }
.table-wrap table { margin: 0 auto; }
html { overflow-x: hidden; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d8d8dc; padding: 4px 6px; text-align: right; vertical-align: top; }
th { background: #f0f0f3; position: sticky; top: 0; }
td { white-space: nowrap; }
td.text { text-align: left; white-space: normal; min-width: 8em; }
td.text.label { white-space: nowrap; }
td.text.long { min-width: 24em; }
th.text { text-align: left; }
td:first-child, th:first-child { text-align: left; position: sticky; left: 0; background: #fff;
                                 box-shadow: 1px 0 0 #d8d8dc; }
th:first-child { background: #f0f0f3; z-index: 1; }
tr:nth-child(even) td { background: #fafafb; }
figure { margin: 1.5em 0; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 14px; }
.files a, figcaption a { margin: 0 .15em; }
"""


def _html_inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


_NUMBER = re.compile(r"[-+]?[\d.,]+(e[-+]?\d+)?( ± [\d.,e+-]+)?( [kMGTP]?B)?( \(baseline\))?|—|")


def _is_number(text: str) -> bool:
    return bool(_NUMBER.fullmatch(text))


def _html_links(links: Sequence[tuple[str, str]]) -> str:
    return " · ".join(f'<a href="{html.escape(path)}">{html.escape(text)}</a>' for text, path in links)


def _cell_class(text: str, header: str) -> str:
    if _is_number(text):
        return "<td>"
    if len(text) > 60 or "\n" in text:
        return '<td class="text long">'
    return '<td class="text label">' if len(text) <= 40 else '<td class="text">'


def _html_table(block: Table) -> str:
    # A column of text has its header on the left, like its cells.
    texts = [all(not _is_number(row[i]) for row in block.rows) for i in range(len(block.headers))]
    head = "".join(
        ('<th class="text">' if text else "<th>") + f"{html.escape(h)}</th>"
        for h, text in zip(block.headers, texts)
    )
    rows = []
    for row in block.rows:
        cells = "".join(
            _cell_class(c, h) + html.escape(c).replace("\n", "<br>") + "</td>"
            for c, h in zip(row, block.headers)
        )
        rows.append(f"<tr>{cells}</tr>")
    return (
        f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _html_contents(blocks: Sequence[Block]) -> str:
    toc = []
    for heading, figures in _outline(blocks):
        sub = "".join(f'<li><a href="#fig-{f.stem}">{html.escape(f.caption)}</a></li>' for f in figures)
        toc.append(
            f'<li><a href="#{slug(heading.text)}">{_html_inline(heading.text)}</a>'
            + (f"<ul>{sub}</ul>" if sub else "")
            + "</li>"
        )
    return f'<nav class="toc"><strong>Contents</strong><ul>{"".join(toc)}</ul></nav>'


def to_html(blocks: Sequence[Block], title: str, images: Mapping[str, bytes]) -> str:
    """A single HTML file: CSS inline, every figure a PNG ``data:`` URI (``images`` by
    stem), with links to its files; number cells never wrap (a wide table scrolls)."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            anchor = f' id="{slug(block.text)}"' if block.level == 2 else ""
            body.append(f"<h{block.level}{anchor}>{_html_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_html_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{_html_inline(item)}</li>" for item in block.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            body.append(_html_table(block))
        elif isinstance(block, Figure):
            data = base64.b64encode(images[block.stem]).decode("ascii")
            body.append(
                f'<figure id="fig-{block.stem}"><img alt="{html.escape(block.caption)}" '
                f'src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(block.caption)} "
                f'<span class="files">({_html_links(_figure_links(block))})</span></figcaption></figure>'
            )
        elif isinstance(block, Links):
            body.append(f'<p class="files">{html.escape(block.label)}: {_html_links(block.links)}</p>')
        elif isinstance(block, Contents):
            body.append(_html_contents(blocks))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# -- cells ---------------------------------------------------------------------------


def short_error(error: str, limit: int = 240) -> str:
    """The last non-empty line of a traceback (the exception), cut to ``limit`` chars."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def frame_rows(frame: pd.DataFrame, columns: Sequence[tuple[str, Callable[[Any], str]]]) -> Table:
    """A display table: (header, row -> text) per column."""
    rows = [[render(row) for _, render in columns] for row in frame.itertuples(index=False)]
    return Table([header for header, _ in columns], rows)
