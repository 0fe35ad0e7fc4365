"""A small document model, rendered as Markdown and as self-contained HTML.

A document is a list of blocks (:class:`Heading`, :class:`Paragraph`, :class:`Bullets`,
:class:`Table`, :class:`Figure`); text inside a block is a sequence of spans: plain strings,
:class:`Code`, :class:`Bold` and :data:`BREAK`. The report builds one document and renders it twice,
so ``report.md`` and ``report.html`` cannot say different things. Figures are embedded in the HTML
as base64 PNG: the page makes no network request.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Code:
    """Inline code: a path, a spec, a preset name."""

    text: str


@dataclass(frozen=True)
class Bold:
    """Strong inline text."""

    text: str


@dataclass(frozen=True)
class Break:
    """A line break inside a paragraph (a space in Markdown)."""


BREAK = Break()
Span = str | Code | Bold | Break


@dataclass(frozen=True)
class Heading:
    """A section heading; ``anchor``: the HTML heading carries an id, the text in lower case with
    hyphens (a probe's name is its own id)."""

    level: int
    text: str
    anchor: bool = False


@dataclass(frozen=True)
class Paragraph:
    """A paragraph; ``small``: fine print (provenance)."""

    spans: tuple[Span, ...]
    small: bool = False


@dataclass(frozen=True)
class Bullets:
    """A bullet list; ``empty``: the one item shown when there are none (None: no list at all)."""

    items: tuple[str, ...]
    empty: str | None = None


@dataclass(frozen=True)
class Table:
    """A table of text cells; ``row_classes``: a CSS class per row (HTML only)."""

    header: tuple[str, ...]
    rows: tuple[tuple[tuple[Span, ...], ...], ...]
    row_classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Figure:
    """A PNG figure: embedded in HTML, linked as ``link`` (relative to the report) in Markdown."""

    path: Path
    caption: str
    link: str


Block = Heading | Paragraph | Bullets | Table | Figure


@dataclass
class Document:
    """A titled list of blocks."""

    title: str
    blocks: list[Block] = field(default_factory=list)


def md_cell(value) -> str:
    """A value as one Markdown table cell: a ``|`` (as in ``||dW||``) would end the cell and a
    line break the row, so pipes are escaped and line breaks become spaces."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _md_spans(spans) -> str:
    out = []
    for span in spans:
        if isinstance(span, Code):
            out.append(f"`{span.text}`")
        elif isinstance(span, Bold):
            out.append(f"**{span.text}**")
        elif isinstance(span, Break):
            out.append(" ")
        else:
            out.append(span)
    return "".join(out)


def _md_block(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Paragraph):
        text = _md_spans(block.spans)
        return f"<sub>{text}</sub>" if block.small else text
    if isinstance(block, Bullets):
        return "\n".join(f"- {x}" for x in block.items or [block.empty])
    if isinstance(block, Table):
        lines = ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
        lines += ["| " + " | ".join(md_cell(_md_spans(c)) for c in row) + " |"
                  for row in block.rows]
        return "\n".join(lines)
    return f"![{block.caption}]({block.link})"


def _shown(block: Block) -> bool:
    return not (isinstance(block, Bullets) and not block.items and block.empty is None)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def render_markdown(doc: Document) -> str:
    """The document as Markdown: blocks separated by a blank line, figures linked."""
    return "\n\n".join(_md_block(b) for b in doc.blocks if _shown(b)) + "\n"


def _html_spans(spans) -> str:
    out = []
    for span in spans:
        if isinstance(span, Code):
            out.append(f"<code>{html.escape(span.text)}</code>")
        elif isinstance(span, Bold):
            out.append(f"<b>{html.escape(span.text)}</b>")
        elif isinstance(span, Break):
            out.append("<br>")
        else:
            out.append(html.escape(span))
    return "".join(out)


def _html_figure(figure: Figure) -> str:
    data = base64.b64encode(Path(figure.path).read_bytes()).decode()
    caption = html.escape(figure.caption)
    return (f'<figure><img alt="{caption}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


def _html_table(table: Table) -> str:
    classes = table.row_classes or ("",) * len(table.rows)
    lines = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in table.header) + "</tr>"]
    lines += [(f"<tr class='{cls}'>" if cls else "<tr>")
              + "".join(f"<td>{_html_spans(cell)}</td>" for cell in row) + "</tr>"
              for cls, row in zip(classes, table.rows)]
    return "\n".join(lines) + "</table>"


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        anchor = f" id='{_slug(block.text)}'" if block.anchor else ""
        return f"<h{block.level}{anchor}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Paragraph):
        return ("<p class='prov'>" if block.small else "<p>") + _html_spans(block.spans) + "</p>"
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{html.escape(x)}</li>"
                                for x in block.items or [block.empty]) + "</ul>"
    if isinstance(block, Table):
        return _html_table(block)
    return _html_figure(block)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;
padding-bottom:.2em;margin-top:2em}table{border-collapse:collapse;margin:1em 0;font-size:.92em}
td,th{border:1px solid #ccc;padding:.35em .6em;vertical-align:top}th{background:#f3f3f3}
.yes{background:#e3f4e3}.no{background:#fbe6e6}.inc{background:#fdf5d8}.na{background:#eee}img{max-width:100%;
border:1px solid #eee;margin:.5em 0}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}
.prov{color:#666;font-size:.8em}code{background:#f5f5f5;padding:0 .2em}"""


def render_html(doc: Document) -> str:
    """The document as one self-contained HTML page (figures embedded, no external resource)."""
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(doc.title)}"
            f"</title><style>{_CSS}</style></head><body>")
    body = [_html_block(b) for b in doc.blocks if _shown(b)]
    page = "\n".join([head, *body, "</body></html>"])
    if re.search(r"""(src|href)=["']https?:""", page):
        raise ValueError("the report must not fetch anything")
    return page
