"""index.html: the report's tables and figures on one self-contained page (the PNGs beside it)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from p2pmoe.report.tables import cell

STYLE = """body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px}
td.n{text-align:right;font-variant-numeric:tabular-nums}figure{margin:2em 0}img{max-width:100%}
figcaption{font-size:13px;color:#444}li{font-size:13px}"""


def _td(value: Any) -> str:
    kind = "n" if isinstance(value, int | float) else "t"
    return f'<td class="{kind}">{html.escape(cell(value))}</td>'


def html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """An HTML table with the terminal table's number formatting."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_td(r.get(c, "")) for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(
    title: str,
    runs: Sequence[tuple[str, str, str]],
    tables: Sequence[tuple[str, str]],
    figures: Sequence[tuple[str, str, str]],
    notes: Sequence[str] = (),
    folded: Sequence[tuple[str, str]] = (),
) -> str:
    """The page: runs as (label, folder, setting), notes (figures left out and why), tables as
    (heading, HTML) above the figures as (file, title, caption), and `folded` tables (long
    ones, such as every round's) below them, shown on a click."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><ul>",
    ]
    parts += [f"<li><b>{html.escape(label)}</b> ({html.escape(folder)}): {html.escape(setting)}</li>" for label, folder, setting in runs]
    parts.append("</ul>")
    parts += [f"<p><i>{html.escape(note)}</i></p>" for note in notes]
    for heading, table in tables:
        parts.append(f"<h2>{html.escape(heading)}</h2>{table}")
    for file, name, caption in figures:
        image = f"<img src='{html.escape(file)}' alt='{html.escape(name)}'>"
        parts.append(f"<figure><h3>{html.escape(name)}</h3>{image}<figcaption>{html.escape(caption)}</figcaption></figure>")
    for heading, table in folded:
        parts.append(f"<h2>{html.escape(heading)}</h2><details><summary>show</summary>{table}</details>")
    parts.append("</body></html>")
    return "\n".join(parts)
