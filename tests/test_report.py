"""mcad report: the static HTML page, checked as text and rendered in headless Chromium."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from mcad.io import write_json

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
REPO = Path(__file__).resolve().parents[1]


def export_parity() -> dict:
    """A manifest's parity section as the export pipeline writes it: export/parity.py's checks of a
    text and an image encoder (cos_mean, cos_min), their search program and their group's retrieval."""
    from mcad.export.parity import BARS, cosine_stats, retrieval_check, search_check
    from mcad.retrieval import retrieval_metrics

    rng = np.random.default_rng(0)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    ref_img, ref_txt = unit(rng.normal(size=(8, 16))), unit(rng.normal(size=(40, 16)))
    img, txt = unit(ref_img + 0.01 * rng.normal(size=ref_img.shape)), unit(ref_txt + 0.01 * rng.normal(size=ref_txt.shape))
    c2i = np.repeat(np.arange(8), 5)
    fp = {k: round(v, 2) for k, v in retrieval_metrics(ref_img @ ref_txt.T, c2i).items()}
    sims = txt[:4] @ ref_img.T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :5]
    search = search_check(idx, np.take_along_axis(sims, idx, 1), txt[:4], ref_txt[:4], ref_img)
    return {"reference": "eager fp32 student", "data": "data/synth", "n_images": 8, "n_captions": 40,
            "bars": dict(BARS), "fp32": fp,
            "artifacts": {"text_encoder.onnx": {"role": "text", "group": "onnx", **cosine_stats(txt, ref_txt)},
                          "image_encoder.onnx": {"role": "image", "group": "onnx", **cosine_stats(img, ref_img)},
                          "search.onnx": {"role": "search", "group": "onnx", "search": search, "pass": search["pass"]}},
            "retrieval": {"onnx": retrieval_check(img, txt, c2i, fp)}, "simulated": {}, "pass": True}


def bench_rows() -> list[dict]:
    """Rows as `mcad bench` writes them (bench.json): the committed local bench's first rows."""
    return json.loads((REPO / "benchmarks" / "results" / "mcad-s0-local.json").read_text())["rows"][:3]


@pytest.fixture(scope="module")
def full_run(tiny_run, tmp_path_factory):
    """A copy of tiny_run with everything a finished run has: metrics, report.md, export, bench, plots;
    plus a benchmarks/results folder."""
    root = tmp_path_factory.mktemp("report")
    run = root / "runs" / "tiny"
    shutil.copytree(tiny_run, run)
    row = {"i2t_r1": 12.5, "i2t_r5": 40.0, "i2t_r10": 55.0, "t2i_r1": 11.0, "t2i_r5": 38.0, "t2i_r10": 52.0, "rsum": 208.5}
    write_json(run / "metrics.json", {"variant": "mcad", "seed": 0, "test": {"student": row, "dual teacher": row},
                                      "params": {"student": 123456}, "train_s": 12.3})
    (run / "report.md").write_text("# tiny (mcad, seed 0)\n\n| model | i2t R@1 | rsum |\n|---|---:|---:|\n"
                                   "| student | 12.5 | 208.5 |\n| dual teacher | 30.1 | 400.2 |\n\nstudent 123,456 params\n")
    exp = run / "export" / "cpu"
    exp.mkdir(parents=True)
    from mcad.artifacts import Artifact, ExportManifest, Tensor

    (exp / "text_encoder.onnx").write_bytes(b"\0" * 1234)
    write_json(exp / "manifest.json", ExportManifest(  # the type mcad.export writes
        target="cpu", run=str(run), model="student-tiny", embed_dim=64, context_length=24, image_size=64,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
        artifacts=[Artifact("text_encoder", "text", "onnxruntime", "onnx", "text_encoder.onnx", 1234, "0" * 64, "int8",
                            [Tensor("ids", [1, 24], "int64")], [Tensor("emb", [1, 64], "float32")])],
        skipped=[{"artifact": "image_encoder.qnn", "reason": "no QNN SDK"}],
        parity=export_parity()).to_json())
    (run / "bench").mkdir()
    write_json(run / "bench" / "bench.json", {"rows": bench_rows()})  # json only: no bench.md to show instead
    results = root / "results"
    results.mkdir()
    # the repository's own tables (another run's) and one results file of this run (named so)
    (results / "ablation.md").write_text("# Ablation\n\n| variant | rsum |\n|---|---:|\n| no-KD | 100.0 ± 1.0 |\n"
                                         "| MCAD | 120.0 ± 2.0 |\n")
    (results / "bench-of-another.md").write_text("# Bench\n\n| x |\n|---|\n| 777.7 |\n")
    write_json(results / "bench-of-another.json", {"meta": {"command": "mcad bench run=runs/another"}})
    (results / "tiny-local.md").write_text("# Bench of tiny\n\n| subject | p50 |\n|---|---:|\n| student | 3.21 |\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([1, 2, 3], [3, 1, 2])
    fig.savefig(results / "ablation.png")
    fig.savefig(results / "tiny-local.png")
    fig.savefig(run / "loss.png")
    plt.close(fig)
    return run, results


def _render(run, results, synth_root, out, **kw):
    from mcad.search.report import render

    return render(run, synth_root, results, out, **kw)


def test_report_has_every_section(full_run, synth_root):
    run, results = full_run
    out = _render(run, results, synth_root, run / "report.html")
    h = out.read_text()
    assert h.startswith("<!DOCTYPE html>") and "http://" not in h and "https://" not in h  # no network
    from mcad.search.report import _fmt

    parity, row = export_parity(), bench_rows()[0]
    cos = parity["artifacts"]["text_encoder.onnx"]
    for text in ("208.5", "dual teacher", "400.2", "Bench of tiny", "3.21", "text_encoder.onnx", "no QNN SDK",
                 "cos_mean", _fmt(cos["cos_mean"]), "cos_min", _fmt(cos["cos_min"]), "overlap_at_k_fp32",
                 "search p50 ms", _fmt(row["stages"]["search"]["p50"]), "search p90 ms", "memory MB",
                 _fmt(row["memory"]["headline_mb"]), "tiny-local.png", "loss.png", "Recall, recomputed now"):
        assert text in h, text
    # other runs' results are named under their own heading, never shown as this run's
    assert "120.0 ± 2.0" not in h and "777.7" not in h and "ablation.png" not in h.split("not this run")[0].split("id=\"plots\"")[-1]
    others = h.split("not this run's)")[1].split("</p>")[0]
    assert "ablation.md" in others and "bench-of-another.md" in others and "tiny-local.md" not in others
    blocks = re.findall(r'<div class="q" data-hit="([01])">(.*?)</div></div>', h, flags=re.S)
    assert len(blocks) == 6
    for hit, body in blocks:
        figs = re.findall(r'<figure class="(hit|miss|target)"', body)
        assert len([f for f in figs if f != "target"]) == 5
        assert ("hit" in figs) == (hit == "1") and ("target" in figs) == (hit == "0")
    assert h.count('src="data:image/png;base64,') >= 6 * 5 + 2
    src = h.split('id="sources"')[1]
    assert "metrics.json" in src


def test_report_marks_hits(tiny_run, tmp_path):
    """With a 4-image test split and k=5 every caption's own image is in the top 5: all hits."""
    from mcad.data.synthetic import generate

    generate(tmp_path / "synth4", seed=1, n_train=0, n_val=0, n_test=4, progress=False)
    out = _render(Path(tiny_run), tmp_path / "no_results", tmp_path / "synth4", tmp_path / "r.html", n_queries=4)
    h = out.read_text()
    assert re.findall(r'data-hit="([01])"', h) == ["1"] * 4
    assert h.count('<figure class="hit"') == 4 and "✓ hit" in h and '<figure class="target"' not in h
    assert "no_results" in h  # named as not found
    # the same from an index built with `mcad index data=...` (report index=DIR)
    from mcad.search.encoders import EagerEncoder
    from mcad.search.index import build_index, dataset_paths

    build_index(tmp_path / "idx", EagerEncoder(tiny_run, "image"),
                dataset_paths(str(tmp_path / "synth4" / "dataset_synth.json"), "test"), progress=False)
    h = _render(Path(tiny_run), tmp_path / "no_results", tmp_path / "synth4", tmp_path / "r2.html", n_queries=4,
                index=str(tmp_path / "idx")).read_text()
    assert re.findall(r'data-hit="([01])"', h) == ["1"] * 4 and "from index" in h


CHECK_JS = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var tables = Array.prototype.slice.call(document.querySelectorAll('table'));
  var rows = 0, minw = 1e9;
  tables.forEach(function (t) { rows += t.rows.length; minw = Math.min(minw, t.getBoundingClientRect().width); });
  var d = document.createElement('div');
  d.id = 'render-check';
  d.setAttribute('data-images', imgs.length);
  d.setAttribute('data-images-ok', ok);
  d.setAttribute('data-tables', tables.length);
  d.setAttribute('data-rows', rows);
  d.setAttribute('data-min-table-width', Math.round(tables.length ? minw : 0));
  document.body.appendChild(d);
});
</script>
"""


def _chromium(args: list[str], timeout: int = 90) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _check_in_browser(page: Path) -> dict:
    test_page = page.with_name("_check_" + page.name)  # same folder: relative image paths still resolve
    test_page.write_text(page.read_text().replace("</body>", CHECK_JS + "</body>"))
    r = _chromium(["--virtual-time-budget=15000", "--dump-dom", test_page.resolve().as_uri()])
    m = re.search(r'<div id="render-check"([^>]*)>', r.stdout)
    assert m, f"no render marker in the DOM (chromium rc {r.returncode}): {r.stderr[-800:]}"
    return {k: int(float(v)) for k, v in re.findall(r'data-([a-z-]+)="([^"]*)"', m.group(1))}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium chromium-driver; "
                                               "the CI script installs it)")
@pytest.mark.parametrize("embed", [True, False], ids=["base64", "relative-paths"])
def test_report_renders_in_chromium(full_run, synth_root, tmp_path, embed):
    run, results = full_run
    out = _render(run, results, synth_root, tmp_path / "site" / "report.html", embed=embed)
    if not embed:
        assert 'src="data:' not in out.read_text()
    c = _check_in_browser(out)
    # 6 queries x (5 top + own image when missed) thumbnails + 2 plots, every one decoded
    assert c["images"] >= 6 * 5 + 2, c
    assert c["images-ok"] == c["images"], c
    # metrics, report.md, recall-now, ablation, export artifacts + parity + skipped, bench, sources
    assert c["tables"] >= 7 and c["rows"] >= 20 and c["min-table-width"] > 50, c
    if embed:
        shot = tmp_path / "shot.png"
        r = _chromium(["--window-size=1280,2000", f"--screenshot={shot}", out.resolve().as_uri()])
        assert shot.exists(), r.stderr[-800:]
        from PIL import Image

        with Image.open(shot) as im:
            colours = im.convert("RGB").resize((320, 500)).getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50  # not a blank page: text, tables and thumbnails drawn


def test_report_queries_come_from_the_runs_own_data(tokenizer, tmp_path):
    """A run trained on a CSV data set (its manifest's data: spec) shows queries of that set's test
    split, with no synthetic set anywhere (no data/synth in the working folder)."""
    import csv

    from mcad.data.synthetic import generate
    from mcad.io import write_json

    generate(tmp_path / "imgs", seed=3, n_train=0, n_val=0, n_test=4, progress=False)
    rows = json.loads((tmp_path / "imgs" / "dataset_synth.json").read_text())["images"]
    with open(tmp_path / "test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption"])
        for r in rows:
            w.writerow([str(tmp_path / "imgs" / "images" / r["filename"]), r["sentences"][0]["raw"]])
    from conftest import make_run

    run = make_run(tmp_path / "runs" / "csvrun", tokenizer)
    write_json(run / "manifest.json", {"kind": "run", "config": {"name": "csvrun", "data": {
        "format": "csv", "csv": {"train": str(tmp_path / "test.csv"), "test": str(tmp_path / "test.csv")}}}})
    h = _render(run, tmp_path / "no_results", None, tmp_path / "r.html", n_queries=4).read_text()
    assert "example queries failed" not in h and "data.format=csv" in h
    assert len(re.findall(r'data-hit="([01])"', h)) == 4
    assert str(tmp_path / "test.csv") in h.split('id="sources"')[1]
