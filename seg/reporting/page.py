"""HTML building blocks of the report: escaping, tables, data URIs, the page frame and its CSS.

Design choices: plain strings, no template engine and no JavaScript library: the page is one
static file that any browser opens offline. The only script is a few lines that count the
images that decoded (``body[data-images-loaded]``), which the browser test reads back.
"""

from __future__ import annotations

import base64
import html
from typing import Iterable

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1d2329;background:#f6f7f9}
header{background:#1f3a5f;color:#fff;padding:14px 24px}
header h1{margin:0;font-size:20px}
header p{margin:4px 0 0;opacity:.85;font-size:12px}
main{padding:8px 24px 40px;max-width:1400px}
section{background:#fff;border:1px solid #dde2e8;border-radius:6px;margin:16px 0;padding:12px 16px}
h2{font-size:16px;margin:4px 0 10px}
table{border-collapse:collapse;font-size:12px}
td,th{border-bottom:1px solid #e6e9ee;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
.cases{display:grid;grid-template-columns:repeat(auto-fill,minmax(178px,1fr));gap:10px}
.case{border:1px solid #dde2e8;border-radius:4px;padding:6px;font-size:11px;background:#fafbfc}
.case img{display:block;width:160px;height:160px;object-fit:contain;background:#222;margin:0 auto 4px}
.score{font-weight:600}
.flag{display:inline-block;background:#fbe3e0;color:#8a1c12;border-radius:3px;padding:0 4px;margin:1px}
.problem{color:#a4160b;font-weight:600}
.note{color:#5b6570;font-size:12px}
.id{word-break:break-all}
details pre{font-size:11px;background:#f3f5f7;padding:8px;max-height:360px;overflow:auto}
"""

SCRIPT = ("<script>window.addEventListener('load',function(){var n=0,imgs=document.images;"
          "for(var i=0;i<imgs.length;i++){if(imgs[i].complete&&imgs[i].naturalWidth>0)n++;}"
          "document.body.setAttribute('data-images-loaded',n);});</script>")


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value, digits: int = 4) -> str:
    """A table cell's text: floats rounded, None as an en dash."""
    if value is None:
        return "\u2013"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Iterable[str], rows: Iterable[Iterable], element_id: str = "", numeric: bool = True) -> str:
    """An HTML table; numbers are right-aligned. Cells are escaped unless given as ``Raw``."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            cls = ' class="num"' if numeric and isinstance(cell, (int, float)) and not isinstance(cell, bool) else ""
            text = cell.html if isinstance(cell, Raw) else esc(fmt(cell))
            cells.append(f"<td{cls}>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{esc(element_id)}"' if element_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Raw:
    """Cell content that is already HTML."""

    def __init__(self, html_text: str):
        self.html = html_text


def flags_html(flags: Iterable[str]) -> str:
    return "".join(f'<span class="flag">{esc(f)}</span>' for f in flags) or '<span class="note">none</span>'


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def section(element_id: str, title: str, body: str) -> str:
    return f'<section id="{esc(element_id)}"><h2>{esc(title)}</h2>{body}</section>'


def page(title: str, subtitle: str, sections: list[str]) -> str:
    """The whole document: header bar, sections, the image-count script."""
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>"
            f"<main>{''.join(sections)}</main>{SCRIPT}</body></html>\n")
