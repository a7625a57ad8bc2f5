"""Writing the report: one document model rendered twice (Markdown, self-contained HTML),
and the Excel workbook.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from localsgd.util.files import atomic_path

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
class Image:
    path: str
    """Relative to the report folder."""
    alt: str


Block = Heading | Paragraph | Bullets | Table | Image


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


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
        elif isinstance(block, Image):
            out.append(f"![{block.alt}]({block.path})")
    return "\n\n".join(out) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       max-width: 1280px; margin: 2em auto; padding: 0 1.5em; line-height: 1.5; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; padding-bottom: .2em; }
code { background: #f3f3f5; padding: .1em .3em; border-radius: 3px; font-size: 90%; }
.table-wrap { overflow-x: auto; margin: 1em 0; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #d8d8dc; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f0f0f3; position: sticky; top: 0; }
td:first-child, th:first-child, td.text { text-align: left; }
tr:nth-child(even) td { background: #fafafb; }
figure { margin: 1.5em 0; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 14px; }
"""


def _html_inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d.,]+(e[-+]?\d+)?( ± [\d.,e+-]+)?( [kMGTP]?B)?|", text))


def to_html(blocks: Sequence[Block], title: str, images: Mapping[str, bytes]) -> str:
    """A single HTML file: CSS inline, every image a base64 ``data:`` URI."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_html_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            body.append(f"<p>{_html_inline(block.text)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{_html_inline(item)}</li>" for item in block.items)
            body.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
            rows = []
            for row in block.rows:
                cells = "".join(
                    ("<td>" if _is_number(c) else '<td class="text">')
                    + html.escape(c).replace("\n", "<br>")
                    + "</td>"
                    for c in row
                )
                rows.append(f"<tr>{cells}</tr>")
            body.append(
                f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
                f"<tbody>{''.join(rows)}</tbody></table></div>"
            )
        elif isinstance(block, Image):
            data = base64.b64encode(images[block.path]).decode("ascii")
            body.append(
                f'<figure><img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(block.alt)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


# -- cell formatting -------------------------------------------------------------------


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def fmt(value: Any, spec: str = ".4g", scale: float = 1.0) -> str:
    """A number as text; NaN/None blank, ±inf spelled out."""
    if value is None:
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return ""
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    return format(number * scale, spec)


def fmt_pm(mean: Any, std: Any, spec: str, scale: float = 1.0) -> str:
    """``mean ± std``; just the mean when the std is undefined (one seed)."""
    text = fmt(mean, spec, scale)
    if text and _finite(std):
        text += f" ± {fmt(std, spec, scale)}"
    return text


def fmt_bytes(value: Any) -> str:
    if not _finite(value):
        return fmt(value)
    number = float(value)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(number) < 1000 or unit == "TB":
            return f"{number:.3g} {unit}" if unit != "B" else f"{number:.0f} B"
        number /= 1000
    raise AssertionError("unreachable")


def short_error(error: str, limit: int = 240) -> str:
    """The last non-empty line of a traceback (the exception), cut to ``limit`` chars."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def frame_rows(frame: pd.DataFrame, columns: Sequence[tuple[str, Callable[[Any], str]]]) -> Table:
    """A display table: (header, row -> text) per column."""
    rows = [[render(row) for _, render in columns] for row in frame.itertuples(index=False)]
    return Table([header for header, _ in columns], rows)


# -- Excel -----------------------------------------------------------------------------

_ILLEGAL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_EXCEL_CELL_LIMIT = 32767


def _excel_safe(value: Any) -> Any:
    """openpyxl refuses control characters and Excel cells hold at most 32767 chars."""
    if isinstance(value, str):
        value = _ILLEGAL.sub("", value)
        if len(value) > _EXCEL_CELL_LIMIT:
            value = value[: _EXCEL_CELL_LIMIT - 1] + "…"
    return value


def write_xlsx(path: Path, sheets: Mapping[str, pd.DataFrame]) -> Path:
    """One sheet per frame (names cut to Excel's 31 characters), written atomically."""
    with atomic_path(path) as tmp:
        with pd.ExcelWriter(tmp, engine="openpyxl") as writer:
            for name, frame in sheets.items():
                safe = frame.copy()
                for column in safe.columns:
                    if safe[column].dtype == object or pd.api.types.is_string_dtype(safe[column]):
                        safe[column] = safe[column].map(_excel_safe)
                safe.to_excel(writer, sheet_name=name[:31], index=False)
                sheet = writer.sheets[name[:31]]
                sheet.freeze_panes = "A2"
                for i, column in enumerate(safe.columns, start=1):
                    width = min(max(len(str(column)), 8) + 2, 40)
                    sheet.column_dimensions[sheet.cell(1, i).column_letter].width = width
    return path
