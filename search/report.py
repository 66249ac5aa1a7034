"""`mcad report RUN`: one static HTML page, `runs/<name>/report.html`, with everything a run has.

Reads whatever exists (and lists what it did not find): metrics.json, report.md (teachers vs
student), export/*/manifest.json (artifacts, parity, skipped), bench/*.md|json, the PNG plots of the
run folder, and the results files in `results` that are this run's (their name or recorded command
names the run); then runs the student on a handful of test-split captions of the data the run was
trained on (its manifest's `data:` spec; `data=` names another) and shows each one's top-5 images as
thumbnails, hits marked. Results of other runs are listed by name only, under their own heading. No
server, no network: images are embedded as base64 (`embed=false`: relative paths instead).

  mcad report runs/<name> [data=<the run's own>] [queries=6] [results=benchmarks/results]
              [out=runs/<name>/report.html] [index=DIR] [embed=true]
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from mcad.io import atomic_write_text, machine, now_iso, read_json
from mcad.search.html import (CSS, Page, _fmt, bench_records, esc, kv_table, markdown_html,  # noqa: F401
                               records_table, table_html)
from mcad.paths import RESULTS_DIR, RUNS_DIR, bench_dir

log = logging.getLogger("mcad.search.report")
OPTIONS: dict[str, Any] = {"data": None, "queries": 6, "results": str(RESULTS_DIR), "out": None,
                           "index": None, "embed": True, "k": 5}
def section_metrics(page: Page, run: Path) -> None:
    page.add("<h2 id=\"metrics\">Student metrics</h2>")
    mp = run / "metrics.json"
    if page.note_file(mp):
        try:
            m = read_json(mp)
        except ValueError as e:
            page.add(f"<p class=\"err\">{esc(e)}</p>")
            m = {}
        test = m.get("test") if isinstance(m, dict) else None
        if isinstance(test, dict) and test and all(isinstance(v, dict) for v in test.values()):
            cols = [c for c in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
                    if any(c in v for v in test.values())]
            page.add("<h3>Test split (metrics.json)</h3>")
            page.add(table_html(["model"] + [c.replace("_r", " R@") for c in cols],
                                [[name] + [f"{v.get(c, float('nan')):.1f}" for c in cols] for name, v in test.items()]))
        facts = {k: v for k, v in (m.items() if isinstance(m, dict) else []) if k not in ("test", "config")}
        if facts:
            page.add("<h3>Run facts</h3>" + kv_table(facts))
    else:
        page.add("<p class=\"missing\">no metrics.json in the run folder</p>")
    rp = run / "report.md"
    if page.note_file(rp):
        page.add("<h3>Teachers vs student (report.md)</h3>")
        page.add(markdown_html(rp.read_text(errors="replace"), shift=3))


def is_this_runs(path: Path, run: Path) -> bool:
    """A results file belongs to the run when its name carries the run's name or its JSON twin's
    recorded command / run names the run folder (the repository's own tables are other runs')."""
    if re.search(rf"(^|[-_]){re.escape(run.name)}($|[-_])", path.stem):
        return True
    twin = path.with_suffix(".json")
    if not twin.exists():
        return False
    try:
        meta = read_json(twin)
    except (ValueError, OSError):
        return False
    meta = meta.get("meta", meta) if isinstance(meta, dict) else {}
    said = " ".join(str(meta.get(k, "")) for k in ("command", "run"))
    return bool(re.search(rf"(^|[\s=/]){re.escape(str(run))}(/|\s|$)|(^|[\s=/]){re.escape(run.name)}(/|\s|$)", said))


def section_results(page: Page, results: Path, run: Path) -> None:
    page.add(f"<h2 id=\"benchmarks\">Benchmarks of this run ({esc(results)})</h2>")
    if not results.is_dir():
        page.missing.append(str(results))
        page.add(f"<p class=\"missing\">no {esc(results)} folder</p>")
        return
    mds = sorted(results.glob("*.md"))
    own = [md for md in mds if is_this_runs(md, run)]
    for md in own:
        page.note_file(md)
        page.add(f"<h3>{esc(md.name)}</h3>" + markdown_html(md.read_text(), shift=3))
    if not own:
        page.add(f"<p class=\"missing\">no results file of this run in {esc(results)} "
                 f"(<code>make bench RUN={esc(run)}</code> writes one)</p>")
    others = [md.name for md in mds if md not in own]
    if others:
        page.add(f"<h3>Other results in {esc(results)} (not this run's)</h3><p class=\"meta\">"
                 + ", ".join(f"<code>{esc(n)}</code>" for n in others) + "</p>")


def section_export(page: Page, run: Path) -> None:
    page.add("<h2 id=\"export\">Exported artifacts</h2>")
    from mcad.artifacts import find_manifests, load_manifest

    mans = find_manifests(run)
    if not mans:
        page.missing.append(str(run / "export/*/manifest.json"))
        page.add("<p class=\"missing\">no export manifests (run <code>make export</code>)</p>")
    for mp in mans:
        page.note_file(mp)
        try:
            m = load_manifest(mp)
        except (ValueError, FileNotFoundError) as e:  # another version, a missing file: say which, go on
            page.add(f"<p class=\"err\">{esc(e)}</p>")
            continue
        page.add(f"<h3>{esc(mp.parent.name)} <span class=\"meta\">({esc(mp)})</span></h3>")
        if m.artifacts:
            cols = ["name", "role", "runtime", "backend", "file", "bytes", "quantization"]
            page.add(table_html(cols, [[_fmt(getattr(a, c)) for c in cols] for a in m.artifacts]))
        if m.parity:
            page.add("<h4>Parity</h4>" + kv_table(m.parity))
        if m.skipped:
            page.add("<h4>Skipped</h4>" + records_table(m.skipped))


def section_bench(page: Page, run: Path) -> None:
    page.add("<h2 id=\"bench\">Device benchmarks (bench/)</h2>")
    files = sorted(bench_dir(run).glob("**/*.md")) + sorted(bench_dir(run).glob("**/*.json"))
    md_stems = {p.with_suffix("") for p in files if p.suffix == ".md"}
    shown = 0
    for p in files:
        if p.suffix == ".json" and p.with_suffix("") in md_stems:
            continue
        page.note_file(p)
        shown += 1
        page.add(f"<h3>{esc(p.relative_to(run))}</h3>")
        if p.suffix == ".md":
            page.add(markdown_html(p.read_text(errors="replace"), shift=3))
        else:
            try:
                j = read_json(p)
            except ValueError as e:
                page.add(f"<p class=\"err\">{esc(e)}</p>")
                continue
            rows = j.get("rows") if isinstance(j, dict) else None
            page.add(records_table(bench_records(rows)) if isinstance(rows, list) and rows and isinstance(rows[0], dict)
                     else kv_table(j))
    if not shown:
        page.missing.append(str(bench_dir(run)))
        page.add("<p class=\"missing\">no bench results (run <code>make bench</code>)</p>")


def section_plots(page: Page, run: Path, results: Path) -> None:
    page.add("<h2 id=\"plots\">Plots</h2>")
    pngs = sorted(p for p in run.rglob("*.png") if "index" not in p.parts)
    if results.is_dir():
        pngs += [p for p in sorted(results.glob("*.png")) if is_this_runs(p, run)]
    if not pngs:
        page.add("<p class=\"missing\">no plots (PNG files) of this run in the run folder or the results folder</p>")
        return
    page.add("<div class=\"plots\">")
    for p in pngs:
        page.note_file(p)
        page.add(f"<figure><img class=\"plot\" alt=\"{esc(p.name)}\" src=\"{page.img_src(p, thumb=1200)}\">"
                 f"<figcaption>{esc(p)}</figcaption></figure>")
    page.add("</div>")


def pick_queries(c2i: np.ndarray, n_images: int, n: int) -> list[int]:
    """Caption ids: the first caption of images 0-3 (a confuser group: binding decides) and of a
    few images spread over the split."""
    first: dict[int, int] = {}
    for c, i in enumerate(c2i.tolist()):
        first.setdefault(i, c)
    imgs = list(range(min(4, n_images))) + [int(x) for x in np.linspace(4, n_images - 1, max(0, n - 4)).round()]
    out = []
    for i in imgs:
        if i in first and first[i] not in out:
            out.append(first[i])
    return out[:n]


def queries_data(run: Path, data: Any):
    """The data set the example queries come from, as a checked spec: `data=` when given, else the
    run's own (its manifest's `data:`), else the embedded synthetic set for a run from before specs."""
    from mcad.data.spec import DEFAULT_SYNTH_ROOT, parse
    from mcad.runs import run_record

    if data is None:
        data = (run_record(run).get("config") or {}).get("data") or str(DEFAULT_SYNTH_ROOT)
    return parse(data)


def section_queries(page: Page, run: Path, data: Any, n_queries: int, k: int, index: str | None) -> None:
    from mcad.data.spec import load_corpus
    from mcad.retrieval import retrieval_metrics
    from mcad.search.encoders import EagerEncoder
    from mcad.search.index import encode_paths
    from mcad.tokenizer import Tokenizer

    spec = queries_data(run, data)
    page.add(f"<h2 id=\"queries\">Example queries ({esc(spec.describe())}, test split)</h2>")
    corpus = load_corpus(spec, "test")
    page.read.append(str(corpus.report.source))
    tok = Tokenizer.load(run / "tokenizer.json")
    tenc = EagerEncoder(run, "text")
    qids = pick_queries(corpus.caption_to_image, corpus.n_images, n_queries)
    texts = [corpus.captions[c] for c in qids]
    q = tenc(tok.encode_batch(texts))
    if index:
        from mcad.search.query import Searcher

        s = Searcher(index, run=run)
        hits = s.search(texts, k)
        pos = {str(Path(p).resolve()): j for j, p in enumerate(corpus.image_paths)}
        tops = [[(h["score"], pos.get(str(Path(h["path"]).resolve()), -1), Path(h["path"])) for h in hs] for hs in hits]
        page.add(f"<p class=\"meta\">top-{k} from index {esc(index)} ({esc(s.folder.kind)}, {s.folder.index.ntotal} images)</p>")
        ranks = None
    else:
        emb, ok, bad = encode_paths(EagerEncoder(run, "image"), corpus.image_paths, batch=128, progress=False)
        if bad:
            page.add(f"<p class=\"err\">{len(bad)} test images unreadable (first: {esc(bad[0][0])})</p>")
            corpus = corpus.drop_images({corpus.image_paths.index(p) for p, _ in bad})
        sim_all = emb @ tenc(tok.encode_batch(corpus.captions)).T  # [n_img, n_txt]
        m = retrieval_metrics(sim_all, corpus.caption_to_image)
        cols = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
        page.add("<h3>Recall, recomputed now (eager student, whole test split)</h3>")
        page.add(table_html(["model"] + [c.replace("_r", " R@") for c in cols],
                            [["student (report time)"] + [f"{m[c]:.1f}" for c in cols]]))
        sims = q @ emb.T
        order = np.argsort(-sims, axis=1, kind="stable")
        tops = [[(float(sims[r, j]), int(j), Path(corpus.image_paths[j])) for j in order[r, :k]] for r in range(len(texts))]
        ranks = [int(np.where(order[r] == corpus.caption_to_image[qids[r]])[0][0]) + 1 for r in range(len(texts))]
        page.add(f"<p class=\"meta\">top-{k} of {len(corpus.image_paths)} test images by exact cosine; "
                 f"green = the caption's own image (hit); dashed blue = that image when it is not in the top {k}</p>")
    for r, text in enumerate(texts):
        target = int(corpus.caption_to_image[qids[r]])
        hit_at = next((j + 1 for j, (_, i, _) in enumerate(tops[r]) if i == target), None)
        verdict = f"hit at rank {hit_at}" if hit_at else (f"miss (own image at rank {ranks[r]})" if ranks else "miss")
        page.add(f"<div class=\"q\" data-hit=\"{'1' if hit_at else '0'}\"><div class=\"text\">&ldquo;{esc(text)}&rdquo; "
                 f"<span class=\"meta\">&mdash; {verdict}</span></div><div class=\"row\">")
        for j, (score, i, p) in enumerate(tops[r]):
            cls = "hit" if i == target else "miss"
            label = f"#{j + 1} {score:.3f}" + (" ✓ hit" if i == target else "")
            page.add(f"<figure class=\"{cls}\"><img class=\"thumb\" alt=\"{esc(p.name)}\" title=\"{esc(p)}\" "
                     f"src=\"{page.img_src(p, thumb=160)}\"><figcaption>{esc(label)}</figcaption></figure>")
        if not hit_at:
            tp = Path(corpus.image_paths[target])
            page.add(f"<figure class=\"target\"><img class=\"thumb\" alt=\"{esc(tp.name)}\" title=\"{esc(tp)}\" "
                     f"src=\"{page.img_src(tp, thumb=160)}\"><figcaption>own image"
                     f"{' (rank ' + str(ranks[r]) + ')' if ranks else ''}</figcaption></figure>")
        page.add("</div></div>")


def render(run: Path, data: Any, results: Path, out: Path, n_queries: int = 6, k: int = 5,
           index: str | None = None, embed: bool = True) -> Path:
    from mcad.io import sha256_file
    from mcad.runs import resolve_run

    run = resolve_run(run)
    page = Page(out, embed)
    sha = sha256_file(run / "student.safetensors")
    sections = [("metrics", "Student metrics"), ("queries", "Example queries"), ("benchmarks", "Benchmarks"),
                ("export", "Exported artifacts"), ("bench", "Device benchmarks"), ("plots", "Plots")]
    section_metrics(page, run)
    try:
        section_queries(page, run, data, n_queries, k, index)
    except (ValueError, FileNotFoundError, OSError) as e:  # a broken data set or index: say so, keep the rest
        page.add(f"<p class=\"err\">example queries failed: {esc(e)}</p>")
    section_results(page, results, run)
    section_export(page, run)
    section_bench(page, run)
    section_plots(page, run, results)
    nav = " · ".join(f"<a href=\"#{a}\">{esc(t)}</a>" for a, t in sections)
    head = (f"<h1>mcad run report: {esc(run.name)}</h1>"
            f"<p class=\"meta\">run folder <code>{esc(run)}</code> · student sha256 <code>{sha[:16]}</code> · "
            f"generated {esc(now_iso())} on {esc(machine())}</p><p>{nav}</p>")
    sources = ("<h2 id=\"sources\">Sources</h2><p class=\"meta\">read:</p><ul>"
               + "".join(f"<li><code>{esc(p)}</code></li>" for p in dict.fromkeys(page.read)) + "</ul>"
               + ("<p class=\"meta\">not found (sections left empty):</p><ul>"
                  + "".join(f"<li class=\"missing\"><code>{esc(p)}</code></li>" for p in dict.fromkeys(page.missing))
                  + "</ul>" if page.missing else ""))
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>mcad report: {esc(run.name)}</title>"
           f"<style>{CSS}</style></head><body>\n{head}\n" + "\n".join(page.parts) + f"\n{sources}\n</body></html>\n")
    atomic_write_text(out, doc)
    return out


def main(argv: list[str] | None = None) -> int:
    from mcad.search.common import parse_args

    pos, opts, _ = parse_args(list(argv or []), OPTIONS, positional=1, usage=__doc__ or "")
    if pos:
        run = Path(pos[0])
    else:
        from mcad.runs import latest_run

        run = latest_run(RUNS_DIR)
    out = Path(opts["out"]) if opts["out"] else run / "report.html"
    path = render(run, opts["data"], Path(str(opts["results"])), out, int(opts["queries"]),
                  int(opts["k"]), opts["index"], bool(opts["embed"]))
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB); open it in a browser (no server needed)")
    return 0
