"""Bench results -> markdown table, PNG plot (latency vs gallery size per runtime), console lines."""
from __future__ import annotations

from pathlib import Path

from mcad.io import atomic_path, atomic_write_text


def _f(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _stage(r: dict, name: str, q: str = "p50"):
    return ((r.get("stages") or {}).get(name) or {}).get(q)


def _q(r: dict) -> str:
    from mcad.benchmarks.subjects import quant_family

    return quant_family(r.get("quantization", ""))


def _art(r: dict) -> str:
    """artifact name, with its export target and file (two targets can ship different files)."""
    t = r.get("target") or ""
    return f"{r.get('artifact')} ({t + ': ' if t and t != 'bench-made' else ''}{r.get('file', '')})"


def _gallery(r: dict) -> str:
    """N, and the gallery's storage where it is not fp32 (faiss SQ: int8 / fp16; + re-rank)."""
    dt = r.get("gallery_dtype") or "fp32"
    if dt == "fp32" or r.get("role") == "search":
        return str(r.get("gallery"))
    return f"{r.get('gallery')} {dt}" + (f" +rerank x{r['rerank']}" if r.get("rerank") else "")


def search_table(rows: list[dict]) -> list[str]:
    lines = ["| subject | artifact | runtime | quant | thr | gallery | tokenize p50 | encode p50 | score+top-k p50 | "
             "search p50 | p90 | p99 | memory MB | peak | bare | added | recall@10 vs fp32 | runner |",
             "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in rows:
        if r.get("mode") != "search":
            continue
        if r.get("error"):
            lines.append(f"| {r['subject']} | {_art(r)} | {r['runtime']} | {_q(r)} | {r['threads']} | {r.get('gallery')} | "
                         f"failed: {r['error'][:80]} |||||||||||")
            continue
        m = r.get("memory") or {}
        mem = _f(m.get("headline_mb"), 1) + (" (added)" if (m.get("headline") or "").startswith("added") else "")
        lines.append(f"| {r['subject']} | {_art(r)} | {r['runtime']} | {_q(r)} | {r['threads']} | {_gallery(r)} | "
                     f"{_f(_stage(r, 'tokenize'), 3)} | {_f(_stage(r, 'encode'), 3)} | {_f(_stage(r, 'score_topk'), 3)} | "
                     f"{_f(_stage(r, 'search'), 3)} | {_f(_stage(r, 'search', 'p90'), 3)} | {_f(_stage(r, 'search', 'p99'), 3)} | "
                     f"{mem} | {_f(m.get('peak_mb'), 1)} | {_f(m.get('bare_mb'), 1)} | {_f(m.get('added_mb'), 1)} | "
                     f"{_f(r.get('recall_at_10'), 3)} | {r.get('runner', '')} |")
    return lines


def image_table(rows: list[dict]) -> list[str]:
    sel = [r for r in rows if r.get("mode") == "image"]
    if not sel:
        return []
    lines = ["| subject | runtime | quant | thr | image px | encode p50 | p90 | p99 | memory MB | peak | bare | added |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in sel:
        if r.get("error"):
            lines.append(f"| {r['subject']} | {r['runtime']} | {_q(r)} | {r['threads']} | | failed: {r['error'][:80]} |||||||")
            continue
        m = r.get("memory") or {}
        mem = _f(m.get("headline_mb"), 1) + (" (added)" if (m.get("headline") or "").startswith("added") else "")
        lines.append(f"| {r['subject']} | {r['runtime']} | {_q(r)} | {r['threads']} | {r.get('image_size') or ''} | "
                     f"{_f(_stage(r, 'encode'), 3)} | {_f(_stage(r, 'encode', 'p90'), 3)} | {_f(_stage(r, 'encode', 'p99'), 3)} | "
                     f"{mem} | {_f(m.get('peak_mb'), 1)} | {_f(m.get('bare_mb'), 1)} | {_f(m.get('added_mb'), 1)} |")
    return lines


def ratio_table(ratios: list[dict]) -> list[str]:
    if not ratios:
        return []
    lines = ["| ours | peer | what | runtime | quant | thr | gallery | latency ours / peer (p50 ms) | ratio | "
             "memory ours / peer (MB) | ratio |",
             "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for x in ratios:
        lines.append(f"| {x['ours']} | {x['peer']} | {x['what']} | {x['runtime']} | {x['quant']} | {x['threads']} | "
                     f"{x.get('gallery') or ''} | {_f(x['latency_ours'], 3)} / {_f(x['latency_peer'], 3)} | "
                     f"{_f(x['latency_ratio'], 3)} | {_f(x['memory_ours'], 1)} / {_f(x['memory_peer'], 1)} | "
                     f"{_f(x['memory_ratio'], 3)} |")
    return lines


def markdown(res: dict) -> str:
    dev = res.get("device", {})
    lines = [f"# Search latency and running memory: {res.get('run_name', '')} on {dev.get('device', '?')}", "",
             f"- command: `{res['command']}`", f"- date: {res['date']}", f"- machine: {res['machine']}",
             f"- device: {dev.get('device')} ({dev.get('kind')}), SoC: {dev.get('soc') or '-'}, "
             f"CPU: {dev.get('cpu') or '-'}",
             f"- score + top-k: {res['scorer_note']}",
             f"- gallery: {res['gallery_note']}",
             "- search = encode + score + top-k (from token ids to the top-10 ids); tokenize is timed beside it; "
             "times in ms (p50/p90/p99 over the runs after warm-up)",
             "- memory: " + res["memory_note"], ""]
    if res.get("quick"):
        lines += ["*quick mode: small gallery, few runs (CI gate), not a figure to quote*", ""]
    lines += ["## Subjects", ""]
    for s in res.get("subjects", []):
        p = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in (s.get("params") or {}).items())
        lines.append(f"- **{s['name']}** ({s['kind']}): {s['source']}; params {p or '-'}; "
                     f"{len(s.get('artifacts', []))} artifacts" + (f"; skipped: {len(s['skipped'])}" if s.get("skipped") else ""))
        for n in s.get("notes", []):
            lines.append(f"  - {n}")
        for sk in s.get("skipped", []):
            lines.append(f"  - skipped {sk.get('artifact')}: {sk.get('reason')}")
    lines += ["", "## Search (text query -> top-10 gallery ids)", ""] + search_table(res["rows"])
    img = image_table(res["rows"])
    if img:
        lines += ["", "## Image tower (one image -> embedding; gallery indexing cost)", ""] + img
    rat = ratio_table(res.get("ratios", []))
    if rat:
        lines += ["", "## Ours vs peers (ratio < 1: ours is faster / smaller)", ""] + rat
    b = res.get("budget") or {}
    lines += ["", "## Budgets", ""]
    if not b.get("device"):
        lines.append(f"No budget entry for this device in {b.get('file', 'budgets.yaml')}: reported only.")
    else:
        lines.append(f"Budget entry `{b['device']}` ({b.get('file')}): {b.get('broken', 0)} broken of "
                     f"{len(b.get('checks', []))} checks.")
        lines += ["", "```"] + [c["line"] for c in b.get("checks", [])] + ["```"]
    if res.get("errors"):
        lines += ["", "## Failed jobs", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> Path | None:
    """Search latency p50 vs gallery size, one line per subject/runtime/quant, one panel per thread count."""
    rows = [r for r in res["rows"] if r.get("mode") == "search" and not r.get("error") and _stage(r, "search")]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads), figsize=(6.5 * len(threads), 4.6), squeeze=False)
    for ax, t in zip(axes[0], threads):
        series: dict[str, list] = {}
        for r in rows:
            if r["threads"] == t:
                series.setdefault(f"{r['subject']} {r['runtime']} {_q(r)}", []).append((r["gallery"], _stage(r, "search")))
        for label, pts in sorted(series.items()):
            pts.sort()
            style = "--" if not label.startswith(("student ", "student-mobile ")) else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=label)
        budget = (res.get("budget") or {}).get("limits", {}).get("student", {})
        if budget:
            g = sorted(int(k) for k in budget)
            ax.plot(g, [budget[k].get("p50_ms") if k in budget else budget[str(k)].get("p50_ms") for k in g],
                    ":", color="red", label="budget p50 (student)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("gallery size (images)")
        ax.set_ylabel("search latency p50 (ms)")
        ax.set_title(f"{res['device'].get('device')}: {t} thread{'s' if t > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_markdown(res: dict, path: Path) -> Path:
    return atomic_write_text(path, markdown(res))


def console_summary(res: dict) -> list[str]:
    """Measured vs budget, one line each, and the last line saying what broke (if anything)."""
    lines = []
    for r in res["rows"]:
        if r.get("parity"):  # benched with allow_failed_parity=1: said on the row itself
            r = dict(r, subject=f"{r['subject']} {r['parity']}")
        if r.get("error"):
            lines.append(f"FAILED {r['subject']}/{r['runtime']}/t{r['threads']}/N={r.get('gallery')}: {r['error']}")
            continue
        st, m = r.get("stages") or {}, r.get("memory") or {}
        if r["mode"] == "search":
            s = st.get("search") or {}
            dt = "" if (r.get("gallery_dtype") or "fp32") == "fp32" else f"/{r['gallery_dtype']}" + (
                f"+rr{r['rerank']}" if r.get("rerank") else "")
            rec = f"  recall@10 {r['recall_at_10']:.3f}" if r.get("recall_at_10") is not None else ""
            lines.append(f"{r['subject']:<15} {r['artifact'][:12]:<12} {r['runtime']:<11} {_qf(r):<5} t{r['threads']} "
                         f"N={str(r['gallery']) + dt:<7} search p50 {_n(s.get('p50'))} p90 {_n(s.get('p90'))} ms  "
                         f"(enc {_n((st.get('encode') or {}).get('p50'))}, score+top-k {_n((st.get('score_topk') or {}).get('p50'))}, "
                         f"tok {_n((st.get('tokenize') or {}).get('p50'))})  mem {_n(m.get('headline_mb'), 1)} MB"
                         + (" added" if (m.get("headline") or "").startswith("added") else "") + rec)
        else:
            e = st.get("encode") or {}
            lines.append(f"{r['subject']:<15} {r['artifact'][:12]:<12} {r['runtime']:<11} {_qf(r):<5} t{r['threads']} "
                         f"image encode p50 {_n(e.get('p50'))} p90 {_n(e.get('p90'))} ms  mem {_n(m.get('headline_mb'), 1)} MB")
    for x in res.get("ratios", []):
        if x["threads"] == 1 and x["what"] == "search" and x.get("gallery") not in (None,):
            lines.append(f"ratio {x['ours']}/{x['peer']} {x['runtime']} {x['quant']} t1 N={x['gallery']}: "
                         f"latency {_n(x['latency_ratio'], 3)}  memory {_n(x['memory_ratio'], 3)}")
    b = res["budget"]
    if b.get("device"):
        lines += [c["line"] for c in b["checks"]]
    else:
        lines.append(f"no budget entry for {res['device'].get('device')} in {b.get('file')}: measured only")
    lines.append(f"wrote {res['files']['markdown']}, {res['files']['json']}" +
                 (f", {res['files']['plot']}" if res["files"].get("plot") else ""))
    broken = [c for c in b.get("checks", []) if not c["ok"]]
    if broken:
        lines.append(f"bench: {len(broken)} budget(s) broken; first: {broken[0]['line'][7:]}")
    if res.get("errors"):
        lines.append(f"bench: {len(res['errors'])} job(s) failed; first: {res['errors'][0]}")
    if res.get("parity_failed"):
        lines.append(f"bench: PARITY FAILED for {', '.join(res['parity_failed'])}: benched because "
                     "allow_failed_parity=1 asked; its figures are not those of a shippable export")
    return lines


def _qf(r: dict) -> str:
    from mcad.benchmarks.subjects import quant_family

    return quant_family(r.get("quantization", ""))


def _n(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"
