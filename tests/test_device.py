"""Device harness: the Python runner on real runtimes, memory fields, budgets and exit codes, the
adb path end to end through a stand-in adb, native runner output parsers, AI Hub without credentials."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from mcad.artifacts import Artifact, Tensor, load_manifest
from mcad.device import get_device
from mcad.device.base import Job, Timing
from mcad.device.errors import DeviceError

FAKE = Path(__file__).parent / "fake_adb"
ADB = str(FAKE / "adb")
QUICK = Timing(warmup=2, min_runs=12, max_runs=200, min_time_s=0.0, max_time_s=2.0)
TEXTS = ["a photo of a red circle above a blue square", "there is a green cross left of a white star"]
PERMISSIVE = """devices:
  local: {match: [local], budgets: {student: {1000: {p50_ms: 1000, p90_ms: 1000, memory_mb: 4000}}}}
  test-phone: {match: [SM8650], budgets: {student: {1000: {p50_ms: 1000, p90_ms: 1000, memory_mb: 4000}}}}
"""
STRICT = """devices:
  local: {match: [local], budgets: {student: {1000: {p50_ms: 0.000001, memory_mb: 4000}}}}
"""


def _fp32_export(run, synth_root, backends, roles, out=None):
    """What `make export` writes for these backends and programs, in fp32 (quick to lower)."""
    from mcad.export.pipeline import Options, export

    return export(Options(run=run, data=synth_root, target="cpu", backends=backends, roles=roles, precision="fp32",
                          parity=False, calib=4, out=out, progress=False))


@pytest.fixture(scope="module")
def export_run(tiny_run, synth_root, tmp_path_factory):
    """A run folder with export/cpu/ as mcad.export writes it: an fp32 ONNX text encoder and an ONNX
    search program with a dynamic gallery size (the int8 artifacts are test_export's), plus one
    skipped entry as a target without its SDK records it."""
    from mcad.artifacts import MANIFEST
    from mcad.io import read_json, write_json

    run = tmp_path_factory.mktemp("exported") / "tiny"
    shutil.copytree(tiny_run, run)
    _fp32_export(run, synth_root, ("onnx",), ("text", "search"))
    path = run / "export" / "cpu" / MANIFEST
    m = read_json(path)
    m["skipped"] = [{"artifact": "text_encoder.xnnpack.int8.pte", "reason": "test fixture"}]
    write_json(path, m)
    return run


def _search_job(artifact, run, gallery=1000, threads=1, tokenizer=True, subject="student"):
    exp = run / "export" / "cpu"
    ids = np.load(exp / "golden.npz")["ids"]
    np.save(exp / "ids.npy", ids)
    return Job(subject=subject, artifact=artifact, threads=threads, mode="search", gallery=gallery,
               ids=exp / "ids.npy", tokenizer=exp / "tokenizer.json" if tokenizer else None,
               tokenizer_feeds_encoder=tokenizer, texts=TEXTS, timing=QUICK)


def _check_memory(mem, runtime):
    assert mem["peak_mb"] > 10 and mem["bare_mb"] > 10, mem
    assert mem["peak_mb"] >= mem["bare_mb"] - 1.0, mem          # same imports + model + gallery
    assert mem["added_mb"] == pytest.approx(mem["peak_mb"] - mem["bare_mb"], abs=0.02)
    assert mem["source"].startswith("/proc/self/status")
    if runtime == "executorch":
        assert mem["bare_mb"] > 200, "ExecuTorch's Python runtime imports torch"
        assert mem["headline_mb"] == mem["added_mb"] and mem["headline"].startswith("added")
    else:
        assert mem["headline_mb"] == mem["peak_mb"] and mem["headline"] == "whole-process peak"


def _check_stages(row, names, min_n=QUICK.min_runs):
    for n in names:
        s = row["stages"][n]
        assert s["n"] >= min_n and 0 < s["p50"] <= s["p90"] <= s["p99"] <= s["max"], (n, s)


# -- runner pieces --------------------------------------------------------------------------------
def test_runner_tokenizer_matches_mcad(tokenizer, tmp_path):
    from mcad.device.runner import MiniTokenizer

    tokenizer.save(tmp_path / "tok.json")
    mini = MiniTokenizer(str(tmp_path / "tok.json"))
    texts = TEXTS + ["<eot> a <sot> word " * 12, ""]
    ref = tokenizer.encode_batch(texts)
    got = np.concatenate([mini.encode(t) for t in texts])
    np.testing.assert_array_equal(got, ref)


def test_percentiles_match_numpy():
    from mcad.device.runner import summarize_ms

    vals = list(np.random.default_rng(0).gamma(2.0, 1.0, 257))
    s = summarize_ms(vals)
    for q in (50, 90, 99):
        assert s[f"p{q}"] == pytest.approx(np.percentile(vals, q), abs=1e-3)


def test_manifest_errors(export_run, tmp_path):
    m = load_manifest(export_run / "export" / "cpu", verify=True)
    assert [a.role for a in m.artifacts] == ["text", "search"] and m.embed_dim == 64
    assert m.tokenizer_path.name == "tokenizer.json" and m.skipped
    assert m.golden_ids().shape == (4, 24) and m.artifacts[1].gallery_rows() == (10, None)
    good = json.loads((export_run / "export/cpu/manifest.json").read_text())
    for change, error, match in (({"file": "missing.onnx"}, FileNotFoundError, "missing.onnx"),
                                 ({"runtime": "tensorrt"}, ValueError, "unknown runtime 'tensorrt'"),
                                 ({"file": "../x.onnx"}, ValueError, "must be a name in the manifest's folder"),
                                 ({"bytes": "12"}, ValueError, "bytes='12' is not a int")):
        bad = json.loads(json.dumps(good))
        bad["artifacts"][0].update(change)
        (tmp_path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(error, match=match):
            load_manifest(tmp_path / "manifest.json")
    # a manifest of another version (the unversioned ones before it) is refused with the command to rebuild it
    old = {k: v for k, v in good.items() if k != "version"}
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=rf"version absent .*make export TARGET=cpu RUN={export_run}`"):
        load_manifest(tmp_path / "manifest.json")


# -- local ----------------------------------------------------------------------------------------
def test_local_onnx_search_and_program(export_run):
    m = load_manifest(export_run / "export" / "cpu")
    text, search = m.artifacts
    with get_device("local") as dev:
        row = dev.run(_search_job(text, export_run, gallery=1000))
        prog = dev.run(_search_job(search, export_run, gallery=1000, tokenizer=False))
        row2 = dev.run(_search_job(text, export_run, gallery=1000, tokenizer=False, subject="student").with_(scorer="numpy"))
        assert len(dev._bare) == 3  # (ort, faiss, tok), (ort, none, no tok), (ort, numpy, no tok)
    _check_stages(row, ["tokenize", "encode", "score_topk", "search", "end_to_end"])
    _check_memory(row["memory"], "onnxruntime")
    assert row["tokenizer_feeds_encoder"] and row["embed_dim"] == 64 and row["scorer"] == "faiss"
    assert row["cpus"] == [sorted(os.sched_getaffinity(0))[0]]
    # 1k x 64 float32 gallery = 0.26 MB: what the process adds over bare is small but not nothing
    assert 0 < row["memory"]["added_mb"] < 80
    _check_stages(prog, ["search"])
    assert prog["scorer"] == "search program" and "encode" not in prog["stages"]
    _check_memory(prog["memory"], "onnxruntime")
    assert row2["scorer"] == "numpy"


def test_local_search_program_agrees_with_encoder_plus_faiss(export_run):
    """Same gallery (seeded) and query: the exported program's top-10 == encoder + faiss's top-10."""
    from mcad.device.runner import run_job

    m = load_manifest(export_run / "export" / "cpu")
    text, search = m.artifacts
    one = Timing(warmup=0, min_runs=1, max_runs=1, min_time_s=0, max_time_s=5)
    j1 = _search_job(text, export_run, gallery=500, tokenizer=False).with_(timing=one)
    j2 = _search_job(search, export_run, gallery=500, tokenizer=False).with_(timing=one)
    r1, r2 = run_job(j1.spec()), run_job(j2.spec())
    assert r1["top_ids_last"] == r2["top_ids_last"]
    assert len(set(r1["top_ids_last"])) == 10 and max(r1["top_ids_last"]) < 500


# -- compressed galleries (issue 14) ----------------------------------------------------------------
def test_runner_sq_galleries_are_faiss_own_codes_and_rerank_is_exact(tmp_path):
    """int8: the two-pass streamed per-dimension ranges give the codes faiss's own SQ8 train + add
    give; fp16 likewise; the memory each holds; a re-rank from the fp32 rows on disk returns the
    exact top-10; without it int8 still finds most of it."""
    import faiss

    from mcad.benchmarks.engine import gallery_file
    from mcad.device.runner import Scorer, _random_chunks

    n, d = 3000, 32
    rows = np.concatenate(list(_random_chunks(n, d, 0, 8192)))
    rng = np.random.default_rng(1)
    queries = rng.standard_normal((20, d), dtype=np.float32)
    exact = np.argsort(-(queries @ rows.T), axis=1)[:, :10]
    for dtype, qt in (("int8", faiss.ScalarQuantizer.QT_8bit), ("fp16", faiss.ScalarQuantizer.QT_fp16)):
        sc = Scorer("faiss", {"n": n, "seed": 0, "dtype": dtype}, 10, d)
        ref = faiss.IndexScalarQuantizer(d, qt, faiss.METRIC_INNER_PRODUCT)
        ref.train(rows)
        ref.add(rows)
        assert faiss.vector_to_array(sc.index.codes).tobytes() == faiss.vector_to_array(ref.codes).tobytes(), dtype
        assert sc.bytes() == n * d * (1 if dtype == "int8" else 2) and sc.n == n
        got = [set(sc.search(q).tolist()) for q in queries]
        assert np.mean([len(g & set(e.tolist())) for g, e in zip(got, exact)]) / 10 >= (0.9 if dtype == "int8" else 0.99)
    f = gallery_file(tmp_path, n, d)
    np.testing.assert_array_equal(np.load(f), rows)  # the bench's file is the runner's seeded gallery
    sc = Scorer("faiss", {"n": n, "file": str(f), "dtype": "int8", "rerank": 4}, 10, d)
    assert [sc.search(q).tolist() for q in queries] == exact.tolist()
    with pytest.raises(Exception, match="rerank needs the fp32 rows on disk"):
        Scorer("faiss", {"n": n, "seed": 0, "dtype": "int8", "rerank": 4}, 10, d)


def test_bench_compressed_gallery_rows_memory_and_recall(export_run, tmp_path, capsys):
    """`gallery=fp32,int8 rerank=4`: the encoder + scan path runs once per gallery, the search program
    on fp32 only; the int8 rows hold a quarter of the gallery's bytes and report recall@10 against
    exact search (1.0 with the re-rank)."""
    from mcad.benchmarks.cli import main

    (tmp_path / "ok.yaml").write_text(PERMISSIVE)
    code = main(["device=local", f"run={export_run}", "quick=1", "galleries=20000", "runtimes=onnxruntime",
                 "gallery=fp32,int8,pq4", "rerank=4", f"budgets={tmp_path / 'ok.yaml'}", f"out={tmp_path / 'out'}",
                 "results=none", "runs=5", "warmup=1"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    text = {r["gallery_dtype"]: r for r in rows if r["artifact"] == "text_encoder"}
    assert set(text) == {"fp32", "int8", "pq4"} and [r["gallery_dtype"] for r in rows if r["role"] == "search"] == ["fp32"]
    # pq4: fast-scan codes in memory (a fraction of int8's bytes), the best rows re-ranked from the fp32 file
    assert text["pq4"]["gallery_bytes"] < text["int8"]["gallery_bytes"] and text["pq4"]["recall_at_10"] >= 0.95
    assert text["fp32"]["gallery_bytes"] == 20000 * 64 * 4 and text["int8"]["gallery_bytes"] == 20000 * 64
    assert text["int8"]["recall_at_10"] == 1.0 and text["int8"]["rerank"] == 4 and "queries" not in text["int8"]
    assert text["fp32"].get("recall_at_10") is None
    assert "N=20000/int8+rr4" in out and "recall@10 1.000" in out
    from mcad.benchmarks.cli import parse_args

    with pytest.raises(ValueError, match="gallery=int4: expected some of fp32, fp16, int8, pq4"):
        parse_args(["gallery=int4"])


@pytest.fixture(scope="module")
def litert_pte(tiny_run, synth_root, tmp_path_factory):
    """fp32 LiteRT and ExecuTorch XNNPACK text encoders, made by mcad.export."""
    out = tmp_path_factory.mktemp("rt") / "export"
    _fp32_export(tiny_run, synth_root, ("xnnpack", "tflite"), ("text",), out=out)
    return load_manifest(out)


def test_local_litert_and_executorch(litert_pte, export_run):
    arts = litert_pte.artifacts
    assert [(a.role, a.runtime) for a in arts] == [("text", "executorch"), ("text", "litert")]
    with get_device("local") as dev:
        rows = [dev.run(_search_job(a, export_run, gallery=2000)) for a in arts]
    for a, row in zip(arts, rows):
        _check_stages(row, ["tokenize", "encode", "score_topk", "search"])
        _check_memory(row["memory"], a.runtime)
        assert row["embed_dim"] == 64


def test_host_runtimes_refuse_in_one_line(litert_pte, tmp_path):
    """mcad.runtimes: a broken program is one line naming it and the ExecuTorch worker stays up for
    the next; a runtime this machine has not and a wrong input count are refused."""
    from mcad.runtimes import ExecuTorchWorker, open_artifact

    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program")
    text = {a.runtime: a for a in litert_pte.artifacts if a.role == "text"}
    ids = np.zeros((1, 24), np.int64)
    with ExecuTorchWorker() as worker:
        with pytest.raises(RuntimeError, match=r"bad\.pte: ExecuTorch could not load it"):
            open_artifact(bad, worker=worker)
        with open_artifact(text["executorch"].path, worker=worker) as s:
            assert s.run([ids])[0].shape == (1, 64) and s.inputs[0]["dtype"] == "int64"
            with pytest.raises(ValueError, match="takes 1 input"):
                s.run([ids, ids])
    with pytest.raises(ValueError, match="no host runtime for 'qnn'"):
        open_artifact(text["litert"].path, "qnn")


# -- budgets and the CLI ------------------------------------------------------------------------
def test_bench_cli_budget_pass_and_fail(export_run, tmp_path, capsys):
    from mcad.benchmarks.cli import main

    (tmp_path / "ok.yaml").write_text(PERMISSIVE)
    (tmp_path / "strict.yaml").write_text(STRICT)
    base = [f"run={export_run}", "quick=1", "runtimes=onnxruntime", f"out={tmp_path / 'out'}", "results=none",
            "warmup=1", "runs=8"]
    assert main(base + [f"budgets={tmp_path / 'ok.yaml'}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(ln.startswith("ok ") and "search latency p50" in ln for ln in out)
    res = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert res["command"].startswith("mcad bench") and res["date"] and res["machine"]
    assert {r["artifact"] for r in res["rows"]} == {"text_encoder", "search"}
    assert res["budget"]["device"] == "local" and res["budget"]["broken"] == 0
    assert (tmp_path / "out" / "bench_latency.png").stat().st_size > 1000
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "| student | text_encoder (cpu: text_encoder.fp32.onnx) | onnxruntime | fp32 |" in md and "skipped text_encoder.xnnpack.int8.pte" in md

    assert main(base + [f"budgets={tmp_path / 'strict.yaml'}"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("bench: ") and "budget(s) broken" in last
    assert re.search(r"local/student:(search|text_encoder)/N=1000/onnxruntime/fp32/t1 search latency p50", last)


def test_bench_cli_bad_input_is_one_line(export_run, tmp_path, capsys):
    from mcad.cli import main

    assert main(["bench", f"run={tmp_path / 'nope'}", "quick=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such run folder" in err[0]
    assert main(["bench", f"run={export_run}", "threads=a"]) == 1
    assert "threads: expected a list of ints, got 'a'" in capsys.readouterr().err
    assert main(["bench", f"run={export_run}", "colour=red"]) == 1
    assert "colour: unknown key" in capsys.readouterr().err


def test_budgets_file_and_matching():
    from mcad.benchmarks.budgets import load_budgets, match_device

    b = load_budgets()
    assert match_device(b, ["SM8650"])[0] == "snapdragon-8-gen-3"
    assert match_device(b, ["", "pineapple"])[0] == "snapdragon-8-gen-3"
    assert match_device(b, ["MT6989"])[0] == "dimensity-9300"
    assert match_device(b, ["local"])[0] == "local"
    assert match_device(b, ["unknown-soc"]) == (None, None)
    for name, entry in b["devices"].items():
        if name == "gate":  # CI's gate: relative latency and memory, per runtime and program
            for g in (1000, 100000):
                lim = entry["budgets"]["student"][g]
                assert set(lim) == {"executorch", "onnxruntime", "litert"}
                want = {"p50_x", "memory_mb"} if g == 100000 else {"memory_mb"}  # 1k latency: runner noise
                assert all(set(p) == want for rt in lim.values() for p in rt.values())
                assert all(set(rt) == {"search", "text_encoder"} for rt in lim.values())
            continue
        for g in (1000, 10000, 100000):
            assert set(entry["budgets"]["student"][g]) == {"p50_ms", "p90_ms", "memory_mb"}
    with pytest.raises(KeyError, match="budget='nope'"):
        match_device(b, ["local"], "nope")


# -- adb through the stand-in ---------------------------------------------------------------------
@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    root = tmp_path / "device"
    monkeypatch.setenv("FAKE_ADB_ROOT", str(root))
    monkeypatch.setenv("FAKE_ADB_DEVICES", "fake-1:device")
    monkeypatch.setenv("FAKE_ADB_PROPS", "ro.soc.model=SM8650,ro.board.platform=pineapple,ro.product.model=Fake S24")
    monkeypatch.setenv("FAKE_ADB_PYTHON", sys.executable)
    monkeypatch.delenv("FAKE_ADB_HANG_ON", raising=False)
    return root


def _adb_log(root):
    return [json.loads(ln) for ln in (root / "adb.log").read_text().splitlines()]


def test_fake_adb_end_to_end_python_runner(export_run, fake_adb, tmp_path, capsys):
    from mcad.benchmarks.cli import main

    (tmp_path / "ok.yaml").write_text(PERMISSIVE)
    code = main(["device=fake-1", f"adb={ADB}", f"run={export_run}", "quick=1", "runtimes=onnxruntime",
                 "runner=python", f"budgets={tmp_path / 'ok.yaml'}", f"out={tmp_path / 'out'}", "results=none",
                 "runs=8", "warmup=1"])
    assert code == 0, capsys.readouterr()
    res = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert res["device"]["soc"] == "SM8650" and res["device"]["props"]["ro.board.platform"] == "pineapple"
    assert res["budget"]["device"] == "test-phone" and res["budget"]["broken"] == 0
    rows = res["rows"]
    assert {r["device_kind"] for r in rows} == {"adb"} and all(r["soc"] == "SM8650" for r in rows)
    text = next(r for r in rows if r["artifact"] == "text_encoder")
    _check_stages(text, ["tokenize", "encode", "score_topk", "search"], min_n=8)
    _check_memory(text["memory"], "onnxruntime")
    assert text["cpus"] == [max(os.sched_getaffinity(0))]  # the highest-numbered core, like a big core
    calls = _adb_log(fake_adb)
    shells = [c[-1] for c in calls if "shell" in c]
    assert any("taskset" in s and "mcad_runner.py" in s and "OMP_NUM_THREADS=1" in s for s in shells)
    assert any("push" in c for c in calls) and any("getprop" in s for s in shells)
    assert shells[-1].startswith("rm -rf ") and not list((fake_adb / "data/local/tmp").glob("mcad-bench-*"))


def test_fake_adb_native_runners(export_run, fake_adb, tmp_path, monkeypatch):
    """No Python on the device: runner=auto takes the native runners; their output is parsed."""
    monkeypatch.delenv("FAKE_ADB_PYTHON")
    (tmp_path / "m.pte").write_bytes(b"PTE" * 100)
    (tmp_path / "m.tflite").write_bytes(b"TFL3" * 100)
    exp = export_run / "export" / "cpu"
    ids = np.load(exp / "golden.npz")["ids"]
    np.save(tmp_path / "ids.npy", ids)
    def art(runtime, backend, file, dtype):
        return Artifact("text_encoder", "text", runtime, backend, file, 300, "", "int8",
                        inputs=[Tensor("ids", [1, 24], dtype)], outputs=[Tensor("emb", [1, 64], "float32")],
                        root=tmp_path)

    arts = [art("executorch", "xnnpack", "m.pte", "int64"), art("litert", "tflite", "m.tflite", "int32")]
    dev = get_device("fake-1", adb=ADB, et_runner=str(FAKE / "executor_runner"),
                     tflite_runner=str(FAKE / "benchmark_model"))
    with dev:
        assert dev.info["python"] is None
        et, tfl = (dev.run(Job(subject="student", artifact=a, threads=1, gallery=1000, ids=tmp_path / "ids.npy",
                               timing=Timing(warmup=1, min_runs=20))) for a in arts)
    assert et["runner"] == "native:executor_runner" and et["stages"]["encode"]["n"] == 20
    assert 1.0 <= et["stages"]["encode"]["p50"] <= et["stages"]["encode"]["p90"] <= 1.1
    assert et["memory"]["peak_mb"] > 24 and et["memory"]["headline"] == "whole-process peak"
    assert tfl["runner"] == "native:benchmark_model" and tfl["stages"]["encode"]["mean"] == pytest.approx(1.201, abs=1e-3)
    assert tfl["native"]["peak_mb"] == 21.3 and tfl["memory"]["peak_mb"] > 16
    shells = [c[-1] for c in _adb_log(fake_adb) if "shell" in c]
    assert any("--num_executions=20" in s and "--cpu_threads=1" in s and "--inputs=" in s for s in shells)
    assert any("--report_peak_memory_footprint=true" in s and "--input_layer_value_files=ids:" in s for s in shells)


@pytest.mark.parametrize("devices,serial,expect", [
    ("", "fake-1", "device 'fake-1' not found (attached: none)"),
    ("other:device", "fake-1", "device 'fake-1' not found (attached: other (device))"),
    ("fake-1:unauthorized", "fake-1", "is unauthorized: accept the 'Allow USB debugging' prompt"),
    ("fake-1:offline", "fake-1", "is offline"),
])
def test_fake_adb_device_errors_are_one_line(export_run, fake_adb, monkeypatch, capsys, devices, serial, expect):
    from mcad.cli import main

    monkeypatch.setenv("FAKE_ADB_DEVICES", devices)
    assert main(["bench", f"device={serial}", f"adb={ADB}", f"run={export_run}", "quick=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err


def test_adb_missing_binary_runner_and_timeout(export_run, fake_adb, tmp_path, monkeypatch, capsys):
    from mcad.cli import main

    assert main(["bench", "device=fake-1", f"adb={tmp_path / 'no-adb'}", f"run={export_run}", "quick=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not found (install it: `apt-get install -y adb`" in err[0]

    monkeypatch.delenv("FAKE_ADB_PYTHON")  # no Python on the device, no native runner configured
    args = ["bench", "device=fake-1", f"adb={ADB}", f"run={export_run}", "quick=1", "runtimes=onnxruntime",
            f"out={tmp_path / 'o'}", "results=none"]
    assert main(args) == 1  # said before anything is built, pushed or run
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fake-1 runs none of runtimes=onnxruntime" in err[0], err
    assert "adb: fake-1: no native runner for onnxruntime" in err[0]
    assert not (tmp_path / "o").exists() and not [c for c in _adb_log(fake_adb) if "push" in c]

    monkeypatch.setenv("FAKE_ADB_PYTHON", sys.executable)
    monkeypatch.setenv("FAKE_ADB_HANG_ON", "mcad_runner.py --spec")
    dev = get_device("fake-1", adb=ADB, timeout_s=3)
    m = load_manifest(export_run / "export" / "cpu")
    with dev, pytest.raises(DeviceError, match=r"timed out after 3 s"):
        dev.run(_search_job(m.artifacts[0], export_run))
    assert not list((fake_adb / "data/local/tmp").glob("mcad-bench-*"))  # cleaned up all the same


def test_adb_quotes_everything(fake_adb, export_run):
    """A remote folder with spaces and shell syntax stays one argument; nothing gets executed."""
    m = load_manifest(export_run / "export" / "cpu")
    root = "/data/local/tmp/we ird;touch PWNED"
    with get_device("fake-1", adb=ADB, remote_root=root, runner="python") as dev:
        assert " " in dev.dir
        row = dev.run(_search_job(m.artifacts[0], export_run).with_(timing=Timing(0, 3, 3, 0, 1)))
    assert row["stages"]["search"]["n"] == 3
    assert not list(fake_adb.rglob("PWNED")) and not (fake_adb / "PWNED").exists()
    with pytest.raises(DeviceError, match="not a device serial"):
        get_device("-s")


# -- native output parsers (documented formats) -------------------------------------------------
ET_LOG = """I 00:00:00.000612 executorch:executor_runner.cpp:107] Resetting threadpool with num threads = 4
I 00:00:00.001201 executorch:executor_runner.cpp:290] Model file /data/local/tmp/m.pte is loaded.
I 00:00:00.001210 executorch:executor_runner.cpp:299] Using method forward
I 00:00:00.001301 executorch:executor_runner.cpp:351] Setting up CPU planned buffer 0, size 12800.
I 00:00:00.004523 executorch:executor_runner.cpp:418] Model loaded in 3.214000 ms.
I 00:00:00.006001 executorch:executor_runner.cpp:521] Iteration 1 of 4: 1.400000 ms
I 00:00:00.007201 executorch:executor_runner.cpp:521] Iteration 2 of 4: 1.100000 ms
I 00:00:00.008401 executorch:executor_runner.cpp:521] Iteration 3 of 4: 1.200000 ms
I 00:00:00.009601 executorch:executor_runner.cpp:521] Iteration 4 of 4: 1.000000 ms
I 00:00:00.009700 executorch:executor_runner.cpp:533] Model executed successfully 4 time(s) in 4.700000 ms.
I 00:00:00.009712 executorch:executor_runner.cpp:540] 1 outputs:
OutputX 0: tensor(sizes=[1, 64], [0.0123, -0.0456, ...])
"""
ET_OLD = """I 00:00:00.002000 executorch:executor_runner.cpp:181] Model executed successfully 10 time(s) in 15.000000 ms.
"""
TFL_OLD = """STARTING!
Log parameter values verbosely: [0]
Num threads: [1]
Graph: [/data/local/tmp/albert_base.tflite]
#threads used for CPU inference: [1]
Loaded model /data/local/tmp/albert_base.tflite
INFO: Initialized TensorFlow Lite runtime.
The input model file size (MB): 11.983
Initialized session in 20.283ms.
Running benchmark for at least 1 iterations and at least 0.5 seconds but terminate if exceeding 150 seconds.
count=2 first=339304 curr=266325 min=266325 max=339304 avg=302814 std=36489

Running benchmark for at least 50 iterations and at least 1 seconds but terminate if exceeding 150 seconds.
count=50 first=266601 curr=266931 min=265837 max=268116 avg=266473 std=419

Inference timings in us: Init: 20283, First inference: 339304, Warmup (avg): 302814, Inference (avg): 266473
Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
Memory footprint delta from the start of the tool (MB): init=14.2461 overall=22.5
"""


def test_parse_executor_runner():
    from mcad.device.native import parse_executor_runner

    p = parse_executor_runner(ET_LOG)
    assert p["iterations_ms"] == [1.4, 1.1, 1.2, 1.0] and p["n"] == 4 and p["total_ms"] == 4.7
    assert p["load_ms"] == pytest.approx(3.214)
    assert p["encode"]["p50"] == pytest.approx(1.15) and p["encode"]["max"] == 1.4
    old = parse_executor_runner(ET_OLD)
    assert old["n"] == 10 and old["encode"]["mean"] == 1.5 and old["encode"]["p50"] is None
    with pytest.raises(ValueError, match="0x22"):
        parse_executor_runner("E 00:00:00.000100 executorch:executor_runner.cpp:245] FileDataLoader::from() failed: 0x22\n")


def test_parse_benchmark_model():
    from mcad.device.native import check_exit, parse_benchmark_model, parse_vmhwm

    p = parse_benchmark_model(TFL_OLD)
    assert p["warmup"]["count"] == 2 and p["runs"]["count"] == 50 and p["runs"]["std"] == 419
    assert p["avg_us"] == 266473 and p["init_us"] == 20283 and p["first_us"] == 339304
    assert p["mem_init_mb"] == pytest.approx(14.2461) and p["mem_overall_mb"] == 22.5 and p["peak_mb"] is None
    assert p["encode"]["mean"] == pytest.approx(266.473) and p["encode"]["n"] == 50 and p["encode"]["p50"] is None
    new = "\n".join("INFO: " + ln for ln in TFL_OLD.splitlines()) + \
        "\nINFO: Overall peak memory footprint (MB) via periodic monitoring: 38.0313\n"
    assert parse_benchmark_model(new)["peak_mb"] == pytest.approx(38.0313)
    with pytest.raises(ValueError, match="Failed to mmap"):
        parse_benchmark_model("STARTING!\nERROR: Failed to mmap model x.tflite\n")
    assert parse_vmhwm("VmHWM:\t   20480 kB\nVmHWM:  30720 kB\n") == 30.0
    with pytest.raises(DeviceError, match="exited with 1: ERROR: boom"):
        check_exit("ERROR: boom\nexit=1\n", "benchmark_model")


# -- Qualcomm AI Hub ------------------------------------------------------------------------------
def test_qaihub_without_credentials_is_one_line(export_run, tmp_path, monkeypatch, capsys):
    from mcad.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("QAIHUB_CLIENT_INI", raising=False)
    with pytest.raises(DeviceError, match=r"client\.ini not found"):
        get_device("qaihub:Samsung Galaxy S24").connect()
    assert main(["bench", "device=qaihub:Samsung Galaxy S24", f"run={export_run}", "quick=1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mcad bench: error: qaihub: ") and "client.ini" in err[0]
    with pytest.raises(DeviceError, match="no device name"):
        get_device("qaihub:")


def test_qaihub_profile_parser():
    from mcad.device.qaihub import parse_profile

    prof = {"execution_summary": {"estimated_inference_time": 1520, "estimated_inference_peak_memory": 12 * 2**20,
                                  "first_load_time": 250000, "warm_load_time": 40000,
                                  "inference_memory_peak_range": [3 * 2**20, 12 * 2**20],
                                  "all_inference_times": [1500, 1520, 1490, 1600, 1510]},
            "execution_detail": [{"name": "fc", "type": "FULLY_CONNECTED", "compute_unit": "NPU", "execution_time": 20},
                                 {"name": "gather", "type": "GATHER", "compute_unit": "CPU", "execution_time": 5}]}
    p = parse_profile(prof)
    assert p["encode"]["p50"] == pytest.approx(1.51) and p["encode"]["n"] == 5 and p["encode"]["estimated_ms"] == 1.52
    assert p["peak_mb"] == 12.0 and p["peak_range_mb"] == [3.0, 12.0] and p["compute_units"] == {"NPU": 1, "CPU": 1}
    del prof["execution_summary"]["all_inference_times"]
    assert parse_profile(prof)["encode"]["p50"] == pytest.approx(1.52)
    with pytest.raises(ValueError, match="execution_summary"):
        parse_profile({})
