"""`mcad export`: every target/backend that can run here builds its artifacts, runs them in the
real runtime (ExecuTorch, LiteRT, ONNX Runtime) against the eager fp32 student, and writes the
manifest; the search program agrees with brute force; missing SDKs and bad input are one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_run

pytestmark = pytest.mark.slow


def _students():
    from mcad.models.registry import list_models

    return [n for n in list_models("dual") if n.startswith("student-")]


def _train_briefly(model, tokenizer, synth_root, steps: int = 40, seed: int = 0):
    """A few dozen CLIP-loss steps on the small synthetic train split, so embeddings spread out
    and retrieval is above chance (random weights make every image embedding nearly the same)."""
    from mcad.data.images import load_images, normalize
    from mcad.data.karpathy import load_karpathy

    corpus = load_karpathy(synth_root / "dataset_synth.json", split="train")
    px, corpus = load_images(corpus, model.image_size, progress=False)
    pix = normalize(px, model.image_mean, model.image_std)
    ids = torch.as_tensor(tokenizer.encode_batch(corpus.captions))
    c2i = torch.as_tensor(corpus.caption_to_image)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    from real_images import clip_steps

    return clip_steps(model, pix, ids, c2i, steps, 64, opt, g)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tokenizer, synth_root):
    from mcad.models.checkpoint import save_model
    from mcad.runs import load_student

    path = make_run(tmp_path_factory.mktemp("trained") / "tiny", tokenizer, "student-tiny", data=synth_root)
    model = _train_briefly(load_student(path)[0], tokenizer, synth_root)
    save_model(model, path / "student.safetensors")
    return path


def _export(run, synth_root, **kw):
    from mcad.export.pipeline import Options, export

    kw.setdefault("calib", 32)
    kw.setdefault("queries", 8)
    kw.setdefault("progress", False)
    return export(Options(run=run, data=synth_root, **kw))


@pytest.fixture(scope="session")
def cpu_export(trained_run, synth_root):
    """target=cpu, every backend and program, on the briefly trained student-tiny."""
    return _export(trained_run, synth_root, target="cpu")


def _golden_runs(out, role, layout=None, bound=False):
    from mcad.artifacts import gallery_input

    z = np.load(out / "golden.npz")
    if role == "text":
        return [[z["ids"][i:i + 1]] for i in range(len(z["ids"]))]
    if role == "image":
        return [[z["pixels"][i:i + 1]] for i in range(len(z["pixels"]))]
    if bound:  # the program holds its gallery (export.bound)
        return [[z["ids"][i:i + 1]] for i in range(len(z["ids"]))]
    g = gallery_input(z["gallery"], layout)  # as the program takes it (notes.gallery_layout)
    return [[z["ids"][i:i + 1], g] for i in range(len(z["ids"]))]


def _phone_runner(artifact, runs, tmp_path):
    """device/runner.py as it is pushed to a phone (one file, run by path, no mcad import), in
    mode=outputs on `runs`: what the artifact returns there."""
    import shutil
    import subprocess
    import sys

    from mcad.device.base import RUNNER_FILE, parse_runner_output

    work = tmp_path / artifact.file
    work.mkdir()
    shutil.copy(RUNNER_FILE, work / "mcad_runner.py")
    np.savez(work / "in.npz", **{f"in{j}": np.stack([r[j] for r in runs]) for j in range(len(runs[0]))})
    spec = {"mode": "outputs", "runtime": artifact.runtime, "model": str(artifact.path), "threads": 1,
            "input_names": [t.name for t in artifact.inputs], "inputs": "in.npz", "outputs": "out.npz"}
    (work / "spec.json").write_text(json.dumps(spec))
    proc = subprocess.run([sys.executable, "mcad_runner.py", "--spec", "spec.json"], cwd=work, capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    res = parse_runner_output(proc.stdout, f"runner on {artifact.file}")
    assert res["runs"] == len(runs)
    with np.load(work / "out.npz") as z:
        return [z[f"out{j}"] for j in range(len(z.files))]


def _check_runner_agrees_with_host(out, tmp_path):
    """Every artifact of an export, run by the phone runner and by the host runtimes (mcad.runtimes)
    on the golden inputs: the same outputs."""
    from mcad.artifacts import load_manifest
    from mcad.runtimes import ExecuTorchWorker, run_artifact

    m = load_manifest(out)
    assert m.artifacts
    with ExecuTorchWorker(threads=1) as worker:
        for a in m.artifacts:
            runs = _golden_runs(out, a.role, a.gallery_layout, bound="gallery_bound" in a.notes)
            host, spec = run_artifact(a.path, runs, a.runtime, names=[t.name for t in a.inputs], worker=worker)
            phone = _phone_runner(a, runs, tmp_path)
            assert len(phone) == len(host[0]) == len(a.outputs), a.file
            for j, got in enumerate(phone):
                want = np.stack([h[j] for h in host])
                if np.issubdtype(want.dtype, np.integer):  # search indices: runner keeps the runtime's int
                    np.testing.assert_array_equal(got.astype(np.int64), want, err_msg=a.file)
                else:
                    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=a.file)


# -- cpu: XNNPACK .pte, ONNX int8, TFLite int8 ----------------------------------------------------
def test_cpu_manifest(cpu_export, trained_run):
    from mcad.artifacts import MANIFEST_VERSION, ExportManifest, load_manifest
    from mcad.io import sha256_file

    m = cpu_export
    out = trained_run / "export" / "cpu"
    assert m["version"] == MANIFEST_VERSION and m["student_sha256"] == sha256_file(trained_run / "student.safetensors")
    assert load_manifest(out, verify=True).to_json() == m == ExportManifest.from_json(m).to_json()
    assert m["target"] == "cpu" and m["embed_dim"] == 64 and m["context_length"] == 24 and m["image_size"] == 64
    assert m["tokenizer"] == "tokenizer.json" and (out / "tokenizer.json").exists()
    assert json.loads((out / "manifest.json").read_text())["artifacts"] == m["artifacts"]
    for key in ("torch", "executorch", "onnxruntime", "ai-edge-litert"):
        assert key in m["versions"]
    got = {(a["role"], a["backend"], a["runtime"]) for a in m["artifacts"]}
    want = {(r, b, rt) for r in ("text", "image", "search")
            for b, rt in (("xnnpack", "executorch"), ("onnx", "onnxruntime"), ("tflite", "litert"))
            if r != "search" or b == "onnx"}  # XNNPACK's and LiteRT's only bound or asked for (common.RUN_GALLERY_SLOW)
    assert got == want
    slow = {s["artifact"]: s["reason"] for s in m["skipped"]}
    assert set(slow) == {"search.xnnpack.int8.pte", "search.int8.tflite"}
    assert all("bind=<target>" in r and "any_gallery_search=1" in r for r in slow.values())
    for a in m["artifacts"]:
        f = out / a["file"]
        assert f.stat().st_size == a["bytes"] > 0 and sha256_file(f) == a["sha256"]
        assert "int8" in a["quantization"] and a["inputs"] and a["outputs"]
        if a["role"] == "search":
            assert [i["name"] for i in a["inputs"]] == ["ids", "gallery"]
            # ONNX Runtime scans a [D, N] gallery at ~1x faiss, [N, D] at 2.7x (export.programs.SCANS)
            columns = a["runtime"] == "onnxruntime"
            assert a.get("notes", {}).get("gallery_layout", "rows") == ("columns" if columns else "rows")
            assert a["inputs"][1]["shape"] == ([64, "N"] if columns else ["N", 64]) and a["k"] == 10
            assert [o["shape"] for o in a["outputs"]] == [[1, 10], [1, 10]]
            assert a["outputs"][1]["dtype"] == "int64"
        else:
            assert a["outputs"][0]["shape"] == [1, 64] and a["outputs"][0]["dtype"] == "float32"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_cpu_parity_in_real_runtimes(cpu_export):
    p = cpu_export["parity"]
    assert p["n_images"] == 100 and p["n_captions"] == 500
    verdicts = {a["file"]: a["parity_pass"] for a in cpu_export["artifacts"]}
    for name, rec in p["artifacts"].items():
        assert verdicts[name] is rec["pass"] is True, (name, rec)  # each artifact's own verdict, in its entry too
        if rec["role"] in ("text", "image"):
            assert rec["cos_mean"] >= 0.99 and rec["cos_min"] >= 0.97, (name, rec)
            # judged alone: R@1 with the other tower's fp32 embeddings; its worst inputs named, lowest first
            r = rec["retrieval"]
            assert r["pass"] and abs(r["d_i2t_r1"]) <= 1.0 + 1e-9 and abs(r["d_t2i_r1"]) <= 1.0 + 1e-9, (name, r)
            cos = [w["cos"] for w in rec["worst"]]
            assert len(cos) == 5 and cos == sorted(cos) and cos[0] == rec["cos_min"], (name, rec["worst"])
            assert all(0 <= w["index"] < (500 if rec["role"] == "text" else 100) for w in rec["worst"])
    for group, r in p["retrieval"].items():
        assert abs(r["d_i2t_r1"]) <= 1.0 + 1e-9 and abs(r["d_t2i_r1"]) <= 1.0 + 1e-9, (group, r, p["fp32"])
    assert p["pass"], p


def test_search_program_matches_brute_force(cpu_export):
    for name, rec in cpu_export["parity"]["artifacts"].items():
        if rec["role"] != "search":
            continue
        s = rec["search"]
        assert s["queries"] == 8 and s["agree_ties_aside"] == 8 and s["agree_fp32_ties_aside"] == 8, (name, s)
        assert s["max_score_err"] <= 1e-3


def test_golden_npz(cpu_export, trained_run):
    from mcad.export.programs import brute_force_topk
    from mcad.runs import load_student

    z = np.load(trained_run / "export" / "cpu" / "golden.npz")
    model, _ = load_student(trained_run)
    with torch.no_grad():
        te = model.encode_text(torch.as_tensor(z["ids"])).numpy()
        ie = model.encode_image(torch.as_tensor(z["pixels"])).numpy()
    np.testing.assert_allclose(te, z["text_emb"], atol=1e-5)
    np.testing.assert_allclose(ie, z["image_emb"], atol=1e-5)
    _, v, i = brute_force_topk(torch.as_tensor(z["text_emb"]), torch.as_tensor(z["gallery"]))
    np.testing.assert_array_equal(i.numpy(), z["topk_indices"])
    assert z["ids"].dtype == np.int64 and z["captions"].shape == (4,)


@pytest.fixture(scope="session")
def any_gallery_export(cpu_export, trained_run, synth_root, tmp_path_factory):
    """any_gallery_search=1: XNNPACK's and LiteRT's search programs with a run-time gallery too."""
    out = tmp_path_factory.mktemp("anygallery") / "cpu"
    _export(trained_run, synth_root, target="cpu", roles=("text", "search"), any_gallery_search=True, out=out)
    return out


def test_search_program_runs_any_gallery_size(cpu_export, any_gallery_export, trained_run):
    """The run-time-gallery search programs (ONNX Runtime's by default, XNNPACK's and LiteRT's when
    asked for) take a gallery of any row count (>= k), in their layout, and pass parity."""
    from mcad.artifacts import gallery_input, load_manifest
    from mcad.runtimes import open_artifact

    out = any_gallery_export
    m = load_manifest(out)
    assert m.parity["pass"] and not m.skipped, (m.parity, m.skipped)
    z = np.load(out / "golden.npz")
    q = z["ids"][:1]
    layouts = {a.file: a.gallery_layout for a in m.artifacts}
    for name in ("search.xnnpack.int8.pte", "search.int8.onnx", "search.int8.tflite"):
        with open_artifact(out / name, names=["ids", "gallery"]) as s:
            for n in (37, 64, 10):  # resized up and down, in one session
                g = z["gallery"][:n]
                ref = np.argsort(-(g @ z["text_emb"][0]))[:10]
                scores, idx = s.run([q, gallery_input(g, layouts[name])])
                assert idx.dtype == np.int64 and scores.dtype == np.float32, name
                assert idx.shape == (1, 10) and len(set(idx[0].tolist())) == 10 and idx.max() < n, (name, n)
                assert len(set(idx[0].tolist()) & set(ref.tolist())) >= 8, (name, n)  # int8 query vs fp32


@pytest.fixture(scope="session")
def bound_export(cpu_export, trained_run, synth_root, tmp_path_factory):
    """`gallery=`: the search programs with a gallery bound in (the golden file's 100 real image
    embeddings of the trained run), ExecuTorch int8 and LiteRT fp32; ONNX keeps its run-time gallery."""
    gal = tmp_path_factory.mktemp("bound") / "gallery.npy"
    np.save(gal, np.load(trained_run / "export" / "cpu" / "golden.npz")["gallery"])
    return _export(trained_run, synth_root, target="cpu", roles=("text", "search"), gallery=str(gal)), gal


def test_bound_gallery_search_programs(bound_export, trained_run, tmp_path, capsys):
    """The bound programs take the ids only, say which gallery they hold (rows, dtype, sha256), agree
    with exact search over it (int8: up to what int8 can move a score; recall reported), run the same in the phone runner and in the
    bench, which runs them at their own gallery size only; the general export is left as it was."""
    import hashlib

    from mcad.artifacts import load_manifest
    from mcad.benchmarks.cli import main

    m, gal = bound_export
    out = trained_run / "export" / "cpu-bound"
    assert (trained_run / "export" / "cpu" / "search.int8.onnx").exists() and m["parity"]["pass"], m["parity"]
    rows = np.load(gal)
    search = {a["backend"]: a for a in m["artifacts"] if a["role"] == "search"}
    for backend, dtype in (("xnnpack", "int8"), ("tflite", "fp32")):
        a = search[backend]
        assert [i["name"] for i in a["inputs"]] == ["ids"], a
        b = a["notes"]["gallery_bound"]
        assert (b["n"], b["dim"], b["dtype"]) == (100, 64, dtype) and b["source"] == str(gal)
        assert b["sha256"] == hashlib.sha256(rows.astype(np.float32).tobytes()).hexdigest()
        assert a["quantization"].endswith("gallery bound in: " + ("int8 dynamic (per-row int8 weights, the query "
                                                                  "quantized per call)" if dtype == "int8" else "fp32"))
        s = m["parity"]["artifacts"][a["file"]]["search"]
        assert s["gallery"] == 100 and s["queries"] == 8, s
        if dtype == "int8":
            assert s["int8_gallery"] and s["agree_int8_ties_aside"] == 8 and s["recall_at_k"] >= 0.95, s
        else:
            assert s["agree_ties_aside"] == 8 and s["max_score_err"] <= 1e-3, s
    assert search["onnx"]["notes"]["gallery_layout"] == "columns" and "gallery_bound" not in search["onnx"]["notes"]
    _check_runner_agrees_with_host(out, tmp_path)
    (tmp_path / "ok.yaml").write_text("devices:\n  local: {match: [local], budgets: {student: {100: "
                                      "{p50_ms: 1000, p90_ms: 1000, memory_mb: 4000}}}}\n")
    code = main(["device=local", f"run={trained_run}", "target=cpu-bound", "quick=1", "galleries=100,1000",
                 "runtimes=executorch,litert", f"budgets={tmp_path / 'ok.yaml'}", f"out={tmp_path / 'b'}",
                 "results=none", "runs=5", "warmup=1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    bench = json.loads((tmp_path / "b" / "bench.json").read_text())
    ran = {(r["artifact"], r["runtime"], r["gallery"]): r for r in bench["rows"] if r["role"] == "search"}
    assert set(ran) == {("search", "executorch", 100), ("search", "litert", 100)}, sorted(ran)
    assert ran[("search", "executorch", 100)]["gallery_bytes"] == 100 * 64
    assert ran[("search", "litert", 100)]["gallery_bytes"] == 100 * 64 * 4
    assert any("holds a gallery of 100 rows (bound at export); N=1000 not run" in n for n in bench["plan_notes"])


def test_index_bind_makes_programs_holding_its_rows(cpu_export, trained_run, synth_root, tmp_path, capsys):
    """`mcad index ... bind=cpu`: the index's own stored rows bound into the ExecuTorch and LiteRT
    programs in <index>/programs-cpu/, parity passing; an index without embeddings is one line."""
    import hashlib

    from mcad.search import store
    from mcad.search.common import SearchError
    from mcad.search.index import main

    idx = tmp_path / "idx"
    data = str(synth_root / "dataset_synth.json")
    assert main([f"data={data}", "split=test", f"run={trained_run}", f"out={idx}", "bind=cpu", "progress=false"]) == 0
    printed = capsys.readouterr().out
    assert "holds 100 x 64 int8" in printed and "holds 100 x 64 fp32" in printed and "all artifacts pass" in printed
    rows = store.load(idx, with_embeddings=True).embeddings
    m = json.loads((idx / "programs-cpu" / "manifest.json").read_text())
    bound = [a["notes"]["gallery_bound"] for a in m["artifacts"] if "gallery_bound" in a.get("notes", {})]
    assert len(bound) == 2 and {b["sha256"] for b in bound} == {hashlib.sha256(rows.tobytes()).hexdigest()}
    # calibrated and checked on the data the run was trained on (its manifest), not the embedded default
    assert m["calibration"]["source"] == f"{synth_root / 'dataset_synth.json'}:train"
    with pytest.raises(SearchError, match="keeps no embeddings .*keep_embeddings=true to bind it"):
        main([f"data={data}", "split=test", f"run={trained_run}", f"out={tmp_path / 'lean'}", "keep_embeddings=false",
              "bind=cpu", "progress=false"])


def test_bound_gallery_without_parity_records_ids_only(trained_run, synth_root, tmp_path):
    """parity=0 (nothing run here): the manifest still says a bound program takes the ids only, and
    how to make it again (with its gallery)."""
    from mcad.artifacts import load_manifest

    m = _export(trained_run, synth_root, target="cpu", backends=("xnnpack",), roles=("text", "search"),
                gallery="random:50", parity=False, out=tmp_path / "b")
    (s,) = [a for a in m["artifacts"] if a["role"] == "search"]
    assert [i["name"] for i in s["inputs"]] == ["ids"] and s["notes"]["gallery_bound"]["source"] == "random:50"
    assert "gallery=random:50" in load_manifest(tmp_path / "b").rebuild_command()


def test_bound_gallery_bad_input_is_one_line(trained_run, synth_root, tmp_path):
    from mcad.export.pipeline import Options, export

    def run(g, **kw):
        return export(Options(run=trained_run, data=synth_root, target="cpu", roles=("text", "search"),
                              gallery=str(g), progress=False, **kw))
    rows = np.load(trained_run / "export" / "cpu" / "golden.npz")["gallery"]
    np.save(tmp_path / "wide.npy", np.ones((20, 65), np.float32) / np.sqrt(65))
    with pytest.raises(ValueError, match=r"wide.npy: shape \(20, 65\), the student embeds in 64 dims"):
        run(tmp_path / "wide.npy")
    np.save(tmp_path / "raw.npy", rows * 2)
    with pytest.raises(ValueError, match="raw.npy: row 0 has norm 2.0000 .*L2-normalised"):
        run(tmp_path / "raw.npy")
    np.save(tmp_path / "few.npy", rows[:5])
    with pytest.raises(ValueError, match="few.npy: 5 rows, a search program returns 10"):
        run(tmp_path / "few.npy")
    with pytest.raises(ValueError, match="bound_dtype='int4': expected int8 or fp32"):
        run(tmp_path / "few.npy", bound_dtype="int4")


def test_phone_runner_agrees_with_host_runtimes(cpu_export, trained_run, tmp_path):
    """The standalone runner pushed to phones and the host runtime adapter give the same outputs
    on every cpu artifact (ExecuTorch, ONNX Runtime, LiteRT; encoders and search programs)."""
    _check_runner_agrees_with_host(trained_run / "export" / "cpu", tmp_path)


# -- the other students, targets and backends ----------------------------------------------------
def test_vit_student_image_encoders(tokenizer, synth_root, tmp_path):
    """student-tiny-vit (same text tower as student-tiny, ViT image tower): every backend's image
    encoder, run in its runtime, against eager fp32."""
    run = make_run(tmp_path / "vit", tokenizer, "student-tiny-vit")
    for target, backends in (("cpu", ("xnnpack", "onnx", "tflite")), ("dimensity", ("tflite_full",))):
        m = _export(run, synth_root, target=target, backends=backends, roles=("image",), parity_images=40)
        recs = m["parity"]["artifacts"]
        assert len(recs) == len(backends)
        for name, rec in recs.items():
            assert rec["cos_mean"] >= 0.99 and rec["cos_min"] >= 0.97, (name, rec)


def test_dimensity_a8w8_for_nnapi(trained_run, synth_root, tmp_path):
    """npu_activation_bits=8: the A8W8 model NNAPI-only NPUs take (int8 pixels in), same bars."""
    m = _export(trained_run, synth_root, target="dimensity", backends=("tflite_full",), roles=("image",),
                parity_images=40, npu_activation_bits=8, out=tmp_path / "a8w8")
    (a,) = m["artifacts"]
    assert a["file"] == "image_encoder.full_int8.tflite" and a["inputs"][0]["dtype"] == "int8"
    rec = m["parity"]["artifacts"][a["file"]]
    assert rec["cos_mean"] >= 0.99 and rec["cos_min"] >= 0.97, rec


def test_dimensity_full_integer(trained_run, synth_root, tmp_path):
    # any_gallery_search: the full-integer search program with a run-time gallery is made on request
    m = _export(trained_run, synth_root, target="dimensity", backends=("tflite_full", "mediatek"),
                parity_images=40, any_gallery_search=True)
    arts = {a["file"]: a for a in m["artifacts"]}
    # A16W8 by default: int8 weights, int16 activations (8-bit activations lost 1.2 R@1 on the default student)
    assert set(arts) == {"text_encoder.full_a16w8.tflite", "image_encoder.full_a16w8.tflite",
                         "search.full_a16w8.tflite"}
    assert arts["image_encoder.full_a16w8.tflite"]["inputs"][0]["dtype"] == "int16"
    assert arts["image_encoder.full_a16w8.tflite"]["inputs"][0]["quantization"]["scale"] > 0
    assert "int16 pixel input" in arts["image_encoder.full_a16w8.tflite"]["quantization"]
    assert arts["text_encoder.full_a16w8.tflite"]["inputs"][0]["dtype"] == "int32"  # token ids, NPU-friendly
    assert arts["search.full_a16w8.tflite"]["outputs"][1]["dtype"] == "int32"
    p = m["parity"]
    for name, rec in p["artifacts"].items():
        if rec["role"] == "search":
            # each full-integer model is calibrated on its own: the bar is fp32 agreement within
            # the quantization error (parity.search_check), and most lists still match exactly
            assert rec["search"]["shared_query"] is False and rec["pass"], rec
            assert rec["search"]["agree_fp32_ties_aside"] == rec["search"]["queries"], rec
            assert rec["search"]["overlap_at_k_fp32"] >= 0.9, rec
        else:
            assert rec["cos_mean"] >= 0.99 and rec["cos_min"] >= 0.97, (name, rec)
    from mcad.export.backends import mediatek

    if not mediatek.available():
        assert {s["artifact"] for s in m["skipped"]} == {
            "text_encoder.mediatek.mt6989.int8.pte", "image_encoder.mediatek.mt6989.int8.pte",
            "search.mediatek.mt6989.int8.pte"}
        assert all("mtk_converter" in s["reason"] for s in m["skipped"])
    # int8 inputs (quantized from float pixels) and int32 ids: the phone runner agrees with the host
    _check_runner_agrees_with_host(trained_run / "export" / "dimensity", tmp_path)


def test_snapdragon_qnn_without_sdk(trained_run, synth_root, monkeypatch, tmp_path):
    """No SDK: the QNN quantizer still runs (its eager numbers land in the parity record), the HTP
    .pte is skipped with the reason, and strict=1 turns that into an error."""
    from mcad.export.backends.common import SdkMissing

    empty = tmp_path / "empty-sdk"
    empty.mkdir()
    monkeypatch.setenv("QNN_SDK_ROOT", str(empty))
    m = _export(trained_run, synth_root, target="snapdragon", backends=("qnn",), parity_images=30, soc="SM8750")
    assert m["artifacts"] == [] and m["soc"] == "SM8750"
    assert {s["artifact"] for s in m["skipped"]} == {
        "text_encoder.qnn.sm8750.int8.pte", "image_encoder.qnn.sm8750.int8.pte", "search.qnn.sm8750.int8.pte"}
    assert all("QNN_SDK_ROOT" in s["reason"] for s in m["skipped"])
    sim = m["parity"]["simulated"]["qnn-sm8750"]
    assert sim["text"]["cos_mean"] >= 0.99 and sim["image"]["cos_mean"] >= 0.99, sim
    with pytest.raises(SdkMissing, match="QNN_SDK_ROOT"):
        _export(trained_run, synth_root, target="snapdragon", backends=("qnn",), strict=True)


def test_qnn_lowering_with_sdk(trained_run, synth_root, tmp_path):
    from mcad.quantize.pt2e import qnn_sdk_root

    if qnn_sdk_root() is None:
        pytest.skip("QNN lowering needs a QNN SDK at $QNN_SDK_ROOT (lib/x86_64-linux-clang/libQnnHtp.so)")
    m = _export(trained_run, synth_root, target="snapdragon", backends=("qnn",), parity=False, out=tmp_path / "qnn")
    assert {a["backend"] for a in m["artifacts"]} == {"qnn"} and len(m["artifacts"]) == 3


def test_mediatek_lowering_with_sdk(trained_run, synth_root, tmp_path):
    from mcad.export.backends import mediatek

    if not mediatek.available():
        pytest.skip("MediaTek lowering needs the NeuroPilot SDK's mtk_converter and mtk_neuron")
    m = _export(trained_run, synth_root, target="dimensity", backends=("mediatek",), parity=False,
                out=tmp_path / "mtk")
    assert {a["backend"] for a in m["artifacts"]} == {"mediatek"} and len(m["artifacts"]) == 3


def test_mobile_student_fp32_onnx(tokenizer, synth_root, tmp_path):
    """student-mobile (49k-token vocabulary, 224 px) is too slow for int8 runtime parity here;
    its fp32 ONNX export runs in ONNX Runtime and matches eager."""
    assert "student-mobile" in _students()
    run = make_run(tmp_path / "mobile", tokenizer, "student-mobile")
    m = _export(run, synth_root, target="cpu", backends=("onnx",), roles=("text", "image"), precision="fp32",
                calib=4, parity_images=6)
    for name, rec in m["parity"]["artifacts"].items():
        assert rec["cos_min"] >= 0.9999, (name, rec)
    assert all(a["quantization"].startswith("fp32") for a in m["artifacts"])


# -- the export folder: only the tool's own files are ever deleted -------------------------------
def test_out_folder_is_the_tools_own(trained_run, synth_root, tmp_path, capsys):
    """`out=` a user's folder (files there, no export manifest) is refused with one line and
    nothing in it touched; a re-export removes what the previous export there recorded and did not
    write again, and nothing else."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "holiday.onnx").write_bytes(b"not the tool's")
    (user / "notes.txt").write_text("mine")
    fp32 = ["target=cpu", f"run={trained_run}", f"data={synth_root}", "backends=onnx", "roles=text",
            "precision=fp32", "parity=false", "calib=4", "progress=false"]
    code, err = _cli([*fp32, f"out={user}"], capsys)
    assert code == 1 and len(err) == 1, err
    assert "holds files mcad export did not write (holiday.onnx, notes.txt) and no export manifest" in err[0]
    assert sorted(p.name for p in user.iterdir()) == ["holiday.onnx", "notes.txt"]
    assert (user / "holiday.onnx").read_bytes() == b"not the tool's"
    # a folder holding only the user's own file under a name this export would write: refused too (only
    # a killed first export's files, named in its pending record, are taken)
    own = tmp_path / "own"
    own.mkdir()
    (own / "text_encoder.fp32.onnx").write_bytes(b"the user's own model")
    code, err = _cli([*fp32, f"out={own}"], capsys)
    assert code == 1 and len(err) == 1 and "text_encoder.fp32.onnx" in err[0], err
    assert (own / "text_encoder.fp32.onnx").read_bytes() == b"the user's own model"

    out = tmp_path / "exp"
    opts = dict(target="cpu", backends=("onnx",), precision="fp32", parity=False, calib=4, out=out)
    first = _export(trained_run, synth_root, roles=("text",), **opts)
    assert [a["file"] for a in first["artifacts"]] == ["text_encoder.fp32.onnx"]
    (out / "mine.onnx").write_bytes(b"the user's")  # put beside the export: not in its record
    (out / "search.int8.onnx").write_bytes(b"also the user's, under a name export uses")
    second = _export(trained_run, synth_root, roles=("image",), **opts)
    assert [a["file"] for a in second["artifacts"]] == ["image_encoder.fp32.onnx"]
    assert sorted(p.name for p in out.iterdir()) == ["golden.npz", "image_encoder.fp32.onnx", "manifest.json",
                                                     "mine.onnx", "search.int8.onnx", "tokenizer.json"]


def test_one_export_at_a_time_per_folder(trained_run, synth_root, tmp_path, capsys):
    """A second export into a folder another one is writing is refused in one line naming the holder;
    a finished export leaves no lock file (its folder holds only what its manifest records)."""
    from cli_helpers import held_lock

    out = tmp_path / "exp"
    out.mkdir()
    fp32 = ["target=cpu", f"run={trained_run}", f"data={synth_root}", "backends=onnx", "roles=text",
            "precision=fp32", "parity=false", "calib=4", "progress=false", f"out={out}"]
    with held_lock(out, "export") as holder:
        code, err = _cli(fp32, capsys)
        assert code == 1 and len(err) == 1 and f"(pid {holder.pid}) is writing this folder" in err[0], err
    code, err = _cli(fp32, capsys)
    assert code == 0, err
    assert not (out / ".lock").exists() and not (out / ".export.pending.json").exists()


def test_manifest_is_written_last(trained_run, synth_root, tmp_path, monkeypatch):
    """A re-export takes the previous manifest away before it writes anything (a killed one leaves
    no manifest beside new files: readers refuse the folder), and writes its own last; the next
    export still knows the folder's files. A failed export into a new folder leaves no folder."""
    from mcad.artifacts import load_manifest
    from mcad.export.backends import onnx

    out = tmp_path / "exp"
    opts = dict(target="cpu", backends=("onnx",), precision="fp32", parity=False, calib=4, out=out)
    _export(trained_run, synth_root, roles=("text",), **opts)
    m = out / "manifest.json"
    assert all(p.stat().st_mtime_ns <= m.stat().st_mtime_ns for p in out.iterdir())

    def killed(job):
        (job.out / "image_encoder.fp32.onnx").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "build", killed)
    with pytest.raises(KeyboardInterrupt):
        _export(trained_run, synth_root, roles=("image",), **opts)
    assert not m.exists() and (out / "text_encoder.fp32.onnx").exists()
    with pytest.raises(FileNotFoundError):
        load_manifest(out)
    fresh = tmp_path / "new" / "exp"
    with pytest.raises(KeyboardInterrupt):
        _export(trained_run, synth_root, roles=("image",), **dict(opts, out=fresh))
    assert not (tmp_path / "new").exists()
    monkeypatch.undo()
    again = _export(trained_run, synth_root, roles=("image",), **opts)
    assert [a["file"] for a in again["artifacts"]] == ["image_encoder.fp32.onnx"]
    assert sorted(p.name for p in out.iterdir()) == ["golden.npz", "image_encoder.fp32.onnx", "manifest.json",
                                                     "tokenizer.json"]  # the first export's text encoder removed
    assert load_manifest(out, verify=True).artifacts[0].file == "image_encoder.fp32.onnx"


# -- bad input: one line -------------------------------------------------------------------------
def _cli(argv, capsys):
    from mcad.cli import main

    code = main(["export", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_unknown_target_is_one_line(tiny_run, capsys):
    code, err = _cli(["target=tpu", f"run={tiny_run}"], capsys)
    assert code == 1 and len(err) == 1 and "target=tpu: unknown target" in err[0], err


def test_run_without_student_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _cli(["target=cpu", f"run={tmp_path / 'empty'}"], capsys)
    assert code == 1 and len(err) == 1 and "has no student.safetensors" in err[0], err
    code, err = _cli(["target=cpu", f"run={tmp_path / 'nowhere'}"], capsys)
    assert code == 1 and len(err) == 1 and "no such run folder" in err[0], err


def test_corrupt_checkpoint_is_one_line(tmp_path, tokenizer, capsys):
    run = make_run(tmp_path / "bad", tokenizer)
    (run / "student.safetensors").write_bytes(b"\x00not a checkpoint" * 10)
    code, err = _cli(["target=cpu", f"run={run}"], capsys)
    assert code == 1 and len(err) == 1 and "student.safetensors" in err[0], err


def test_strict_without_sdk_is_one_line(tiny_run, capsys, monkeypatch, tmp_path):
    """A refused export says why in one line and leaves no folder behind."""
    monkeypatch.delenv("QNN_SDK_ROOT", raising=False)
    out = tmp_path / "refused" / "exp"
    code, err = _cli(["target=snapdragon", f"run={tiny_run}", "strict=1", f"out={out}"], capsys)
    assert code == 1 and len(err) == 1 and "QNN_SDK_ROOT" in err[0], err
    if not __import__("mcad.export.backends.mediatek", fromlist=["x"]).available():
        code, err = _cli(["target=dimensity", f"run={tiny_run}", "strict=1", f"out={out}"], capsys)
        assert code == 1 and len(err) == 1 and "mtk_converter" in err[0], err
    assert not (tmp_path / "refused").exists()


def test_bad_options_are_one_line(tiny_run, capsys, tmp_path):
    code, err = _cli(["target=cpu", f"run={tiny_run}", "colour=red"], capsys)
    assert code == 1 and len(err) == 1 and "colour: unknown key" in err[0], err
    code, err = _cli(["target=cpu", f"run={tiny_run}", "keep_fp32=bogus", f"out={tmp_path / 'x'}"], capsys)
    assert code == 1 and len(err) == 1 and "keep_fp32: unknown entry" in err[0], err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kw, message", [
    (dict(target="tpu"), "target=tpu: unknown target (one of cpu, snapdragon, dimensity)"),
    (dict(precision="int4"), "precision='int4': expected int8 or fp32"),
    (dict(npu_activation_bits=4), "npu_activation_bits=4: expected 16 (A16W8) or 8 (A8W8)"),
    (dict(bound_dtype="int4"), "bound_dtype='int4': expected int8 or fp32"),
    (dict(calib=0), "calib=0: need at least one calibration sample"),
    (dict(roles=("text", "audio")), "roles=text,audio: expected a subset of text, image, search"),
    (dict(backends=("qnn",)), "backends=qnn: not part of target cpu (xnnpack, onnx, tflite)"),
    (dict(gallery="random:50", roles=("text", "image")), "gallery=random:50: binds a gallery into the search programs"),
    (dict(target="dimensity", soc="mt1234"), "soc=mt1234: unknown Dimensity platform (mt6989, mt6991, mt6993)"),
    (dict(keep_fp32="bogus"), "keep_fp32: unknown entry 'bogus'"),
])
def test_options_are_checked_where_declared(kw, message):
    """Every option is checked once, when the Options are made (by the CLI, the bench, search's bind=)."""
    from mcad.export.options import Options

    with pytest.raises(ValueError) as e:
        Options(**kw)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_options_plan_and_roles():
    """The plan is the target's row of the one backend table (AI Hub on request), less what backends=
    leaves out, in build order; roles come out in their canonical order."""
    from mcad.export.backends import TARGETS, plan
    from mcad.export.options import Options

    assert TARGETS == ("cpu", "snapdragon", "dimensity")
    assert plan("cpu") == ("xnnpack", "onnx", "tflite")
    assert Options(target="SNAPDRAGON").plan() == ("qnn", "xnnpack", "onnx", "tflite")
    assert Options(target="snapdragon", hub=True).plan()[-1] == "hub"
    assert plan("dimensity") == ("tflite_full", "xnnpack", "mediatek")
    assert Options(backends=("tflite", "xnnpack")).plan() == ("xnnpack", "tflite")
    o = Options(roles=("search", "text"), backends=(), parity_images=None)
    assert (o.roles, o.backends, o.parity_images) == (("text", "search"), None, 0)
    assert Options(target="dimensity").soc_name == "mt6989" and Options(target="cpu", soc="SM8750").soc_name == "SM8750"


# -- each artifact's own verdict ---------------------------------------------------------------------
def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _heldout(n: int = 20, dim: int = 16):
    """A held-out set whose fp32 text embeddings retrieve their images (2 captions each)."""
    from mcad.export.check import Heldout
    from mcad.quantize.calib import Samples

    rng = np.random.default_rng(0)
    img = _unit(rng.standard_normal((n, dim)))
    c2i = np.repeat(np.arange(n), 2)
    txt = _unit(img[c2i] + 0.3 * rng.standard_normal((2 * n, dim)))
    test = Samples(pixels=np.zeros((n, 3, 2, 2), np.float32), ids=np.zeros((2 * n, 4), np.int64),
                   caption_to_image=c2i, source="unit:test")
    return Heldout(test, {"text": txt, "image": img}, np.arange(4), img), rng


def _built(role, group, emb, name):
    from pathlib import Path

    from mcad.export.backends.common import Built

    return Built(role, group, "onnxruntime", Path(name), "int8", {"group": group}, outputs=[[e[None]] for e in emb])


def test_each_encoder_is_judged_on_its_own():
    """A text encoder as close to fp32 as can be passes although the image encoder of its runtime
    misses the bars: each is judged with the other tower's fp32 embeddings; the failing one names its
    worst inputs (the images that were broken), and the pair of the runtime still gates the export."""
    from mcad.export.check import judge
    from mcad.export.parity import table

    held, rng = _heldout()
    text = _unit(held.ref["text"] + 1e-4 * rng.standard_normal(held.ref["text"].shape))
    image = held.ref["image"].copy()
    broken = [3, 11, 17]
    image[broken] = _unit(rng.standard_normal((3, image.shape[1])))
    arts = [_built("text", "onnx", text, "text_encoder.int8.onnx"), _built("image", "onnx", image, "image_encoder.int8.onnx")]
    p = judge(arts, held, None, {})
    t, i = p["artifacts"]["text_encoder.int8.onnx"], p["artifacts"]["image_encoder.int8.onnx"]
    assert t["pass"] and t["cos_pass"] and t["retrieval"]["pass"] and t["retrieval"]["d_t2i_r1"] == 0.0, t
    assert not i["pass"] and not i["cos_pass"] and not i["retrieval"]["pass"], i
    assert sorted(w["index"] for w in i["worst"][:3]) == broken
    assert not p["retrieval"]["onnx"]["pass"] and p["pass"] is False
    shown = table(p)
    assert "image_encoder.int8.onnx: lowest cosine on test images" in shown and "SOME ARTIFACT MISSES A BAR" in shown
    rows = {ln.split()[0]: ln.split()[-1] for ln in shown.splitlines()
            if ln.startswith(("text_", "image_", "onnx ")) and not ln.split()[0].endswith(":")}
    assert rows == {"text_encoder.int8.onnx": "yes", "image_encoder.int8.onnx": "NO", "onnx": "NO"}, shown
    # both fine: every verdict passes
    good = [_built("text", "onnx", text, "t.onnx"), _built("image", "onnx", held.ref["image"], "i.onnx")]
    assert judge(good, held, None, {})["pass"] is True


def test_table_reads_a_manifest_from_before_per_artifact_verdicts():
    """A parity section without an encoder's own R@1 shows its runtime pair's, which decided its
    verdict then (search's index and report print tables of older exports)."""
    from mcad.export.parity import table

    old = {"data": "d", "n_images": 10, "n_captions": 50, "fp32": {"i2t_r1": 50.0, "t2i_r1": 40.0},
           "artifacts": {"text_encoder.int8.onnx": {"role": "text", "group": "onnx", "cos_mean": 0.9999,
                                                    "cos_min": 0.999, "n": 50, "pass": True}},
           "retrieval": {"onnx": {"i2t_r1": 40.0, "t2i_r1": 30.0, "d_i2t_r1": -10.0, "d_t2i_r1": -10.0,
                                  "pass": False}},
           "simulated": {}, "pass": False}
    shown = table(old)
    row = next(ln for ln in shown.splitlines() if ln.startswith("text_encoder"))
    assert "40.0 (-10.0)" in row and row.split()[-1] == "NO" and "(pair)" not in shown, shown


def test_default_run_is_latest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = _cli(["target=cpu"], capsys)  # no runs/ here
    assert code == 1 and len(err) == 1 and "no run folder" in err[0], err


def test_r1_bar_is_one_point_or_one_query_on_a_small_split():
    """|dR@1| <= 1.0 point, or one image's worth where the split has under 100 images: on the
    real-data fixture's 12 test images one image's flipped near-tie is 8.3 points in each direction
    (the cosines were 0.9998)."""
    from mcad.export.parity import r1_bar, retrieval_check
    from mcad.retrieval import retrieval_metrics

    assert r1_bar(1000) == 1.0 and r1_bar(100) == 1.0 and r1_bar(12) == pytest.approx(100 / 12)

    def flipped(n: int, flips: int) -> dict:
        ref = np.eye(n, dtype=np.float32)
        c2i = np.arange(n)
        fp = retrieval_metrics(ref @ ref.T, c2i)
        txt = ref.copy()
        mixed = 0.4 * ref[:flips] + 0.6 * np.roll(ref[:flips], 1, axis=1)  # closer to the next image
        txt[:flips] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
        return retrieval_check(ref, txt, c2i, fp)

    small = flipped(12, 1)
    assert small["d_t2i_r1"] == pytest.approx(-8.33, abs=0.01) and small["pass"] and small["r1_bar"] == 8.33
    assert not flipped(12, 2)["pass"]
    assert flipped(1000, 10)["pass"] and not flipped(1000, 11)["pass"]  # 1.0 and 1.1 points
