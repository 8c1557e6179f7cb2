"""A report as a list of blocks (headings, text, tables, images), written once as Markdown
beside its PNG files and once as one self-contained HTML file (images embedded as base64), so
that the HTML can be mailed or attached to a ticket on its own."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.files import atomic_path


@dataclass
class Strong:
    """A table cell or text to stand out (the classes pruning hurt most)."""

    text: str

    def __str__(self) -> str:
        return self.text


@dataclass
class Link:
    """A table cell that opens a page (a model's page in the MLflow UI)."""

    text: str
    href: str

    def __str__(self) -> str:
        return self.text


Cell = str | Strong | Link


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    name: str = ""  # the HTML id, for tests and links


@dataclass
class Image:
    path: Path  # a PNG in the report's folder
    alt: str
    caption: str = ""


Block = Heading | Text | Bullets | Table | Image


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def add(self, *blocks: Block | None) -> None:
        self.blocks.extend(block for block in blocks if block is not None)

    @property
    def images(self) -> list[Image]:
        return [block for block in self.blocks if isinstance(block, Image)]


def to_markdown(document: Document) -> str:
    lines = [f"# {document.title}", ""]
    for block in document.blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Text):
            lines += [_plain(block.text), ""]
        elif isinstance(block, Bullets):
            lines += [f"- {_plain(item)}" for item in block.items] + [""]
        elif isinstance(block, Table):
            lines += _markdown_table(block)
        elif isinstance(block, Image):
            lines += [f"![{block.alt}]({block.path.name})", ""]
            if block.caption:
                lines += [_plain(block.caption), ""]
    return "\n".join(lines)


def _plain(text: str) -> str:
    """Text shown as written: a `*` (a significance mark) must not start italics."""
    return text.replace("\\", "\\\\").replace("*", "\\*")


def _markdown_table(table: Table) -> list[str]:
    def cell(value: Cell) -> str:
        text = _plain(str(value)).replace("|", "\\|")
        if isinstance(value, Link):
            return f"[{text}]({value.href})"
        return f"**{text}**" if isinstance(value, Strong) else text

    lines = [
        "| " + " | ".join(map(cell, table.header)) + " |",
        "|" + "|".join("---" for _ in table.header) + "|",
    ]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in table.rows]
    lines.append("")
    if table.caption:
        lines += [_plain(table.caption), ""]
    return lines


WRAP_AFTER = 24  # characters; longer cells may wrap in report.html
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1400px; padding: 0 1rem;
       color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #eaeef2; padding-bottom: .2rem; }
.scroll { overflow-x: auto; margin: .6rem 0; }
table { border-collapse: collapse; font-size: .84rem; }
th, td { border: 1px solid #d0d7de; padding: .3rem .45rem; text-align: right; }
td { white-space: nowrap; }
td.words { white-space: normal; min-width: 11em; }
th { background: #f6f8fa; }
td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafbfc; }
td strong { color: #b42318; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption, .caption { color: #57606a; font-size: .88rem; }
"""


def to_html(document: Document) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(document.title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(document.title)}</h1>",
    ]
    for block in document.blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{html.escape(item)}</li>" for item in block.items)
            parts.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        elif isinstance(block, Image):
            data = base64.b64encode(block.path.read_bytes()).decode("ascii")
            caption = f"<figcaption>{html.escape(block.caption)}</figcaption>"
            parts.append(
                f'<figure><img alt="{html.escape(block.alt)}" '
                f'src="data:image/png;base64,{data}">{caption if block.caption else ""}</figure>'
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_table(table: Table) -> str:
    def cell(value: Cell, tag: str) -> str:
        text = html.escape(str(value))
        # Numbers stay on one line; a phrase ("..., not significant") may wrap.
        words = ' class="words"' if tag == "td" and len(str(value)) > WRAP_AFTER else ""
        inner = f"<strong>{text}</strong>" if isinstance(value, Strong) else text
        if isinstance(value, Link):
            inner = f'<a href="{html.escape(value.href)}">{text}</a>'
        return f"<{tag}{words}>{inner}</{tag}>"

    head = "<tr>" + "".join(cell(value, "th") for value in table.header) + "</tr>"
    body = "".join("<tr>" + "".join(cell(v, "td") for v in row) + "</tr>" for row in table.rows)
    name = f' id="{html.escape(table.name)}"' if table.name else ""
    caption = f'<p class="caption">{html.escape(table.caption)}</p>' if table.caption else ""
    table_html = f"<table{name}><thead>{head}</thead><tbody>{body}</tbody></table>"
    return f'<div class="scroll">{table_html}</div>{caption}'


def write(document: Document, folder: Path) -> tuple[Path, Path]:
    """report.md (images beside it) and report.html (images inside it) in `folder`."""
    markdown, page = folder / "report.md", folder / "report.html"
    for path, text in ((markdown, to_markdown(document)), (page, to_html(document))):
        with atomic_path(path) as staging:
            staging.write_text(text)
    return markdown, page
