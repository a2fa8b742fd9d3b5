"""Help text and docstrings -> safe markdown: escapes, table cells, code spans, paragraphs."""

from __future__ import annotations

import html
import inspect
import re
import textwrap


def plain_text(value: str) -> str:
    """Plain help text -> safe inline markdown: no rich/click escapes, no raw HTML, no pipes."""
    value = value.replace("\\[", "[").replace("\x08", "")
    value = html.escape(value, quote=False)
    return value.replace("|", "&#124;").replace("*", "\\*")


def cell(value: str) -> str:
    """One table cell: plain text on one line."""
    return " ".join(plain_text(value).split())


def doc_cell(value: str) -> str:
    """One table cell from a docstring: reST literals become code spans."""
    return " ".join(inline(value.replace("``", "`")).split())


def code_span(value: object) -> str:
    """A value as a code span (backticks inside are not expected; fall back to plain text)."""
    text = str(value)
    if "`" in text or "|" in text:
        return cell(text)
    return f"`{text}`"


def rst_to_markdown(doc: str) -> str:
    """A numpy/reST docstring (as pydantic keeps it) -> markdown paragraphs and lists."""
    doc = re.sub(r":(?:class|meth|func|attr|mod):`~?([^`]+)`", r"``\1``", doc)
    doc = doc.replace("``", "`")
    blocks = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(doc)):
        lines = paragraph.splitlines()
        if lines and re.match(r"^[*-] ", lines[0]):
            items: list[str] = []
            for line in lines:
                if re.match(r"^[*-] ", line):
                    items.append(line[2:].strip())
                else:
                    items[-1] += " " + line.strip()
            blocks.append("\n".join(f"- {inline(item)}" for item in items))
        else:
            blocks.append(inline(" ".join(line.strip() for line in lines)))
    return "\n\n".join(blocks)


def inline(value: str) -> str:
    """Escape HTML outside code spans; keep `code` as it is."""
    parts = re.split(r"(`[^`]*`)", value)
    return "".join(p if p.startswith("`") else plain_text(p) for p in parts)


def help_blocks(help_text: str) -> str:
    """Click help -> markdown. A paragraph opened by click's no-rewrap marker (\\b) keeps its
    lines: its indented lines become a code block, the others prose."""
    out = []
    for paragraph in re.split(r"\n\s*\n", inspect.cleandoc(help_text).strip()):
        lines = paragraph.splitlines()
        if lines and lines[0].strip() == "\x08":
            out += _no_rewrap(lines[1:])
        else:
            out.append(plain_text(" ".join(line.strip() for line in lines)))
    return "\n\n".join(block for block in out if block.strip())


def _no_rewrap(lines: list[str]) -> list[str]:
    """The lines of a no-rewrap paragraph -> markdown blocks: each run of indented lines a code
    block, each run of other lines one prose paragraph; a lone marker line ends a run."""
    blocks: list[str] = []
    run: list[str] = []
    run_is_code = False

    def is_code(line: str) -> bool:
        return line[:1].isspace()

    for line in [*lines, "\x08"]:
        marker = line.strip() == "\x08"
        if run and (marker or is_code(line) != run_is_code):
            if run_is_code:
                text = textwrap.dedent("\n".join(run)).strip("\n")
                blocks.append(f"```text\n{text}\n```")
            else:
                blocks.append(plain_text(" ".join(x.strip() for x in run)))
            run = []
        if not marker:
            if not run:
                run_is_code = is_code(line)
            run.append(line)
    return blocks
