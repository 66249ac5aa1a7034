"""The search benchmark in quick mode: the run's student (no export yet: bench-made artifacts), the
mobile-size student, and (toy-sized) peers in the same runtime and pipeline; ratios, budgets, outputs."""
from __future__ import annotations

import json
import re

import pytest
import torch

PERMISSIVE = """devices:
  local:
    match: [local]
    budgets:
      student: {1000: {p50_ms: 1000, p90_ms: 1000, memory_mb: 4000}}
      student-mobile: {1000: {p50_ms: 1000, p90_ms: 1000, memory_mb: 4000}}
"""


def test_quick_bench_with_peers(tiny_run, tmp_path, capsys):
    from mcad.benchmarks.cli import main

    (tmp_path / "b.yaml").write_text(PERMISSIVE)
    code = main([f"run={tiny_run}", "quick=1", "runtimes=onnxruntime", "make_quant=fp32", "peers=tiny", "mobile=1",
                 "image=1", f"cache={tmp_path / 'cache'}", f"out={tmp_path / 'out'}", f"results={tmp_path / 'res'}",
                 f"budgets={tmp_path / 'b.yaml'}", "name=quick-test", "runs=8", "warmup=1"])
    out = capsys.readouterr().out
    assert code == 0, out
    res = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert res["quick"] and res["command"].startswith("mcad bench run=") and res["machine"] and res["date"]
    subjects = {s["name"]: s for s in res["subjects"]}
    assert set(subjects) == {"student", "student-mobile", "clip-tiny-text", "mobilevit-tiny"}
    assert subjects["student"]["source"].startswith("bench-made")  # no export in this run folder
    assert subjects["student-mobile"]["params"]["text"] > 1_000_000
    rows = res["rows"]
    assert not res["errors"] and all(not r.get("error") for r in rows)
    search = {r["subject"] for r in rows if r["mode"] == "search"}
    image = {r["subject"] for r in rows if r["mode"] == "image"}
    assert search == {"student", "student-mobile", "clip-tiny-text"}
    assert image == {"student", "student-mobile", "mobilevit-tiny"}
    for r in rows:
        assert r["memory"]["peak_mb"] > r["memory"]["bare_mb"] > 10
        if r["mode"] == "search":
            assert r["gallery"] == 1000 and set(r["stages"]) >= {"tokenize", "encode", "score_topk", "search"}
    mobile = next(r for r in rows if r["subject"] == "student-mobile" and r["mode"] == "search")
    assert mobile["embed_dim"] == 256 and mobile["tokenizer_feeds_encoder"] is False
    rat = res["ratios"]
    what = {(x["ours"], x["peer"], x["what"]) for x in rat}
    assert ("student", "clip-tiny-text", "search") in what and ("student-mobile", "mobilevit-tiny", "image encode") in what
    # each ratio is its two rows' own figures: search p50 (or encode p50) and headline memory
    def lat(r):
        return r["stages"]["search" if r["mode"] == "search" else "encode"]["p50"]

    for x in rat:
        mode = "search" if x["what"] == "search" else "image"
        pick = [r for r in rows if r["mode"] == mode and r["runtime"] == x["runtime"] and r["threads"] == x["threads"]
                and r.get("gallery") == x["gallery"]]
        (ours,) = [r for r in pick if r["subject"] == x["ours"]]
        peer = [r for r in pick if r["subject"] == x["peer"]]
        assert x["latency_ours"] == lat(ours) and any(x["latency_peer"] == lat(q) for q in peer)
        assert x["latency_ratio"] == pytest.approx(round(x["latency_ours"] / x["latency_peer"], 4))
        assert x["memory_ours"] == ours["memory"]["headline_mb"]
        assert x["memory_ratio"] == pytest.approx(round(x["memory_ours"] / x["memory_peer"], 4))
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "## Ours vs peers" in md and "## Image tower" in md and "quick mode" in md
    assert (tmp_path / "out" / "bench_latency.png").stat().st_size > 1000
    assert (tmp_path / "res" / "quick-test.md").exists() and (tmp_path / "res" / "quick-test.json").exists()
    assert re.search(r"ok     local/student:(search|text_encoder)/N=1000/onnxruntime/fp32/t1 search latency p50", out)
    assert "ratio student/clip-tiny-text onnxruntime fp32 t1 N=1000" in out
    # bench-made artifacts are mcad.export exports, one folder per variant with its manifest, in
    # folders keyed by what they are built from (re-used by the next run)
    from mcad.artifacts import load_manifest

    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 4 and all(c.startswith(tuple(subjects)) for c in cached)
    for c in cached:
        m = load_manifest(tmp_path / "cache" / c / "onnx-fp32", verify=True)
        assert m.artifacts and all(a.quantization.startswith("fp32") and a.runtime == "onnxruntime"
                                   for a in m.artifacts), c
        assert {a.role for a in m.artifacts} <= {"text", "image"}
    assert {s["name"]: {a["role"] for a in s["artifacts"]} for s in res["subjects"]} == {
        "student": {"text", "image"}, "student-mobile": {"text", "image"}, "clip-tiny-text": {"text"},
        "mobilevit-tiny": {"image"}}


def test_ratios_and_quant_family():
    from mcad.benchmarks.engine import ratios
    from mcad.benchmarks.subjects import quant_family

    assert quant_family("int8 static QDQ per-channel") == "int8" and quant_family("") == "fp32"
    assert quant_family("fp32") == "fp32" and quant_family("w8a8 qnn") == "int8"

    def row(subject, p50, mem, quant="int8 x", mode="search", enc=None):
        return {"subject": subject, "mode": mode, "runtime": "litert", "quantization": quant, "threads": 1,
                "gallery": 1000 if mode == "search" else None,
                "stages": {"search": {"p50": p50}, "encode": {"p50": enc or p50}}, "memory": {"headline_mb": mem}}

    rows = [row("student", 2.0, 50.0, enc=1.0), row("clip-vit-b32-text", 40.0, 400.0, quant="int8 y", enc=39.0),
            row("clip-vit-b32-text", 80.0, 300.0, quant="fp32"), row("student-mobile", 4.0, 80.0, mode="image"),
            row("mobilevit-small", 16.0, 100.0, mode="image"), dict(row("student", 1, 1), error="boom")]
    r = ratios(rows)
    s = next(x for x in r if x["ours"] == "student")
    assert s["peer"] == "clip-vit-b32-text" and s["latency_ratio"] == 0.05 and s["memory_ratio"] == 0.125
    assert s["encode_ratio"] == pytest.approx(1 / 39, abs=1e-4)
    im = next(x for x in r if x["what"] == "image encode")
    assert im["latency_ratio"] == 0.25 and im["memory_ratio"] == 0.8
    assert len(r) == 2  # fp32 peer has no int8 student to pair with; failed rows are left out


def test_budget_check_lines():
    from mcad.benchmarks.budgets import check

    entry = {"budgets": {"student": {1000: {"p50_ms": 8, "p90_ms": 12, "memory_mb": 100}}}}
    rows = [{"subject": "student", "mode": "search", "gallery": 1000, "runtime": "litert", "quantization": "int8",
             "threads": 2, "stages": {"search": {"p50": 9.5, "p90": 11.0}}, "memory": {"headline_mb": 80.0}},
            {"subject": "student", "mode": "search", "gallery": 10000, "runtime": "litert", "quantization": "int8",
             "threads": 2, "stages": {"search": {"p50": 99}}, "memory": {}},            # no budget for 10k
            {"subject": "clip-vit-b32-text", "mode": "search", "gallery": 1000}]        # peers: never budgeted
    c = check(rows, entry, "phone")
    assert [x["ok"] for x in c] == [False, True, True]
    assert c[0]["line"] == "BROKEN phone/student/N=1000/litert/int8/t2 search latency p50: 9.50 ms > budget 8 ms"


def test_gallery_quality_fp32_row_is_the_students_own_retrieval(tiny_run, synth_root):
    """The device scan over an fp32 gallery gives the student's text -> image R@k as mcad's evaluation
    computes it from the full similarity matrix; the int8 gallery's exact re-rank gets back (nearly) all of
    the fp32 top-10 that the int8 codes alone miss (a random-weight student's embeddings are all close:
    the hardest case for 8 bits)."""
    from gallery_quality import embeddings, measure
    from mcad.retrieval import retrieval_metrics

    res = measure(tiny_run, str(synth_root), 10)
    rows = {(r["gallery"], r["rerank"]): r for r in res["rows"]}
    img, txt, c2i = embeddings(tiny_run, str(synth_root), "test")
    ref = retrieval_metrics(torch.as_tensor(img @ txt.T), c2i)
    for k in (1, 5, 10):
        assert rows[("fp32", 0)][f"t2i_r{k}"] == pytest.approx(ref[f"t2i_r{k}"], abs=0.01)
    assert rows[("fp32", 0)]["recall_at_10_vs_fp32"] == 1.0
    assert rows[("int8", 4)]["recall_at_10_vs_fp32"] >= max(0.99, rows[("int8", 0)]["recall_at_10_vs_fp32"])
    assert rows[("int8", 0)]["recall_at_10_vs_fp32"] < 1.0  # the codes alone do lose some
    assert rows[("int8", 0)]["bytes_per_image"] * 4 == rows[("fp32", 0)]["bytes_per_image"] == 4 * img.shape[1]
