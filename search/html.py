"""The report's HTML pieces: escaping, markdown and JSON as tables, and the page that collects the
sections and the files it read (mcad.search.report writes the sections)."""
from __future__ import annotations

import base64
import html
import io
import os
import re
from pathlib import Path
from typing import Any

MAX_JSON_ROWS = 120

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:16px 24px;color:#1d2327}
h1{font-size:24px;margin:8px 0} h2{font-size:19px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:16px;margin:18px 0 6px} h4{font-size:14px;margin:12px 0 4px}
table{border-collapse:collapse;margin:8px 0 14px;font-size:13px} th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
code{background:#f3f5f7;padding:0 3px;border-radius:3px;font-size:12px}
.meta{color:#555} .missing{color:#8a6d3b} .err{color:#b00020}
.q{margin:14px 0 18px} .q .text{font-weight:600} .row{display:flex;gap:10px;flex-wrap:wrap;margin-top:6px}
figure{margin:0;text-align:center;font-size:12px} figure img.thumb{width:96px;height:96px;image-rendering:pixelated;border:4px solid #c9ced4;border-radius:4px}
figure.hit img.thumb{border-color:#1a7f37} figure.hit figcaption{color:#1a7f37;font-weight:600}
figure.target img.thumb{border-color:#0969da;border-style:dashed}
img.plot{max-width:100%;border:1px solid #eee;margin:6px 0}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(460px,1fr));gap:12px}
"""


# -- small helpers -----------------------------------------------------------------------------------
def esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _inline(text: str) -> str:
    t = esc(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    t = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)
    return t


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|"):
        line = line[:-1]
    return [c.strip() for c in line.split("|")]


def _is_num(s: str) -> bool:
    return bool(re.fullmatch(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?\s*(%|ms|s|MB)?( ± [\d.]+)?", s.strip()))


def table_html(header: list[str], rows: list[list[Any]]) -> str:
    out = ["<table>", "<tr>" + "".join(f"<th>{_inline(str(h))}</th>" for h in header) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td class=\"num\">{_inline(str(c))}</td>" if _is_num(str(c))
                                    else f"<td>{_inline(str(c))}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def markdown_html(md: str, shift: int = 2) -> str:
    """Headings, pipe tables, lists, code spans, bold, paragraphs: what the project's .md files use."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    para: list[str] = []

    def flush_para() -> None:
        if para:
            out.append("<p>" + " ".join(_inline(p) for p in para) + "</p>")
            para.clear()

    while i < len(lines):
        ln = lines[i].rstrip()
        if not ln.strip():
            flush_para()
            i += 1
        elif ln.lstrip().startswith("|"):
            flush_para()
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            rows = [_cells(b) for b in block]
            if len(rows) > 1 and all(re.fullmatch(r":?-{2,}:?", c or "--") for c in rows[1]):
                out.append(table_html(rows[0], rows[2:]))
            else:
                out.append(table_html(rows[0], rows[1:]))
        elif m := re.match(r"^(#{1,6})\s+(.*)", ln):
            flush_para()
            level = min(6, len(m.group(1)) + shift)
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif re.match(r"^\s*[-*]\s+", ln):
            flush_para()
            items = []
            while i < len(lines) and re.match(r"^\s*[-*]\s+", lines[i]):
                items.append(re.sub(r"^\s*[-*]\s+", "", lines[i]))
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + "</ul>")
        else:
            para.append(ln.strip())
            i += 1
    flush_para()
    return "\n".join(out)


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(obj, list) and obj and all(isinstance(v, (dict, list)) for v in obj):
        out = []
        for j, v in enumerate(obj):
            out += flatten(v, f"{prefix}[{j}]")
        return out
    return [(prefix, obj)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v[:16]) + (" ..." if len(v) > 16 else "")
    return str(v)


def kv_table(obj: Any) -> str:
    rows = flatten(obj)
    more = len(rows) - MAX_JSON_ROWS
    html_ = table_html(["key", "value"], [[k, _fmt(v)] for k, v in rows[:MAX_JSON_ROWS]])
    return html_ + (f"<p class=\"meta\">... {more} more entries in the JSON file</p>" if more > 0 else "")


def records_table(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in cols and not isinstance(v, (dict, list)):
                cols.append(k)
    return table_html(cols, [[_fmt(r.get(c, "")) for c in cols] for r in rows[:MAX_JSON_ROWS]])


# the bench's rows (mcad.benchmarks.engine) nest latency under stages.<stage>.p50/p90 (ms) and memory
# under memory.headline_mb; records_table shows flat values only, so these are lifted into columns
BENCH_COLUMNS = (("search p50 ms", ("stages", "search", "p50")), ("search p90 ms", ("stages", "search", "p90")),
                 ("encode p50 ms", ("stages", "encode", "p50")), ("memory MB", ("memory", "headline_mb")),
                 ("memory", ("memory", "headline")))


def bench_records(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        flat = dict(r)
        for name, path in BENCH_COLUMNS:
            v: Any = r
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            if v is not None:
                flat[name] = v
        out.append(flat)
    return out


class Page:
    def __init__(self, out: Path, embed: bool):
        self.out, self.embed = out, embed
        self.parts: list[str] = []
        self.read: list[str] = []
        self.missing: list[str] = []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def img_src(self, path: Path, thumb: int | None = None) -> str:
        if not self.embed:
            return esc(os.path.relpath(path.resolve(), self.out.parent.resolve()))
        data = path.read_bytes()
        mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
        if thumb and len(data) > 48_000:
            from PIL import Image

            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((thumb, thumb))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                data, mime = buf.getvalue(), "image/png"
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"

    def note_file(self, p: Path) -> bool:
        if p.exists():
            self.read.append(str(p))
            return True
        self.missing.append(str(p))
        return False


# -- sections ----------------------------------------------------------------------------------------
