"""mcad index / mcad search: faiss against numpy brute force on student embeddings, add mode,
refusals, the CLI, ONNX encoders."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from mcad.search import faiss_index, store  # noqa: E402
from mcad.search.common import SearchError  # noqa: E402
from mcad.search.encoders import EagerEncoder, l2n  # noqa: E402
from mcad.search.index import build_index, encode_paths  # noqa: E402
from mcad.search.query import Searcher  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    faiss.omp_set_num_threads(1)


def _numpy_topk(gallery: np.ndarray, q: np.ndarray, k: int):
    s = q.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, 1), order, s


def _tie_aware_recall(ids: np.ndarray, exact_scores: np.ndarray, k: int, tol: float) -> float:
    """Share of returned ids whose exact score reaches the exact k-th best score (minus tol)."""
    kth = -np.sort(-exact_scores, axis=1)[:, k - 1]
    got = np.take_along_axis(exact_scores, np.where(ids < 0, 0, ids), 1)
    return float(((got >= kth[:, None] - tol) & (ids >= 0)).mean())


@pytest.fixture(scope="module")
def student_embs(tiny_run, synth_root):
    """Image embeddings of the whole small synthetic set + text embeddings of test captions."""
    from mcad.data.karpathy import load_karpathy
    from mcad.search.index import dataset_paths

    paths = []
    for split in ("train", "val", "test"):
        paths += dataset_paths(str(synth_root / "dataset_synth.json"), split)
    enc = EagerEncoder(tiny_run, "image")
    emb, ok, bad = encode_paths(enc, paths, batch=128, progress=False)
    assert not bad and len(ok) == len(paths)
    texts, tok = EagerEncoder(tiny_run, "text"), None
    from mcad.tokenizer import Tokenizer

    tok = Tokenizer.load(Path(tiny_run) / "tokenizer.json")
    caps = load_karpathy(synth_root / "dataset_synth.json", split="test").captions[:200]
    q = texts(tok.encode_batch(caps))
    return emb, q


def _spread(emb: np.ndarray, q: np.ndarray, copies: int = 0, seed: int = 0):
    """A random-weight student's embeddings sit in a tiny cone (cosines ~0.9999): centre them on
    the gallery mean so rankings are not decided by float rounding; optionally add jittered copies."""
    mu = emb.mean(0, keepdims=True)
    g, qq = l2n(emb - mu), l2n(q - q.mean(0, keepdims=True))
    if copies:
        rng = np.random.default_rng(seed)
        extra = np.repeat(g, copies, 0) + 0.15 * rng.standard_normal((len(g) * copies, g.shape[1])).astype(np.float32) / np.sqrt(g.shape[1])
        g = l2n(np.concatenate([g, extra]))
    return g.astype(np.float32), qq.astype(np.float32)


def test_flat_matches_numpy_bruteforce(student_embs):
    emb, q = student_embs
    k = 10
    # raw student embeddings (near-degenerate): same scores, ids equal up to ties
    index, _ = faiss_index.build(emb, "flat")
    D, I = faiss_index.search(index, "flat", q, k)
    ns, ni, full = _numpy_topk(emb, q, k)
    np.testing.assert_allclose(D, ns, atol=2e-6)
    assert _tie_aware_recall(I, full, k, tol=2e-6) == 1.0
    # centred embeddings: identical top-k ids wherever consecutive scores are not tied
    g, qq = _spread(emb, q)
    index, _ = faiss_index.build(g, "flat")
    D, I = faiss_index.search(index, "flat", qq, k)
    ns, ni, full = _numpy_topk(g, qq, k)
    np.testing.assert_allclose(D, ns, atol=2e-6)
    gaps = np.diff(-np.sort(-full, axis=1)[:, : k + 1], axis=1)
    clean = (np.abs(gaps) > 1e-5).all(axis=1)
    assert clean.mean() > 0.8
    np.testing.assert_array_equal(I[clean], ni[clean])


@pytest.mark.parametrize("kind,threshold", [("sq8", 0.9), ("ivfsq8", 0.85), ("hnsw", 0.9), ("ivfpq", 0.6)])
def test_compressed_recall(student_embs, kind, threshold, tmp_path):
    emb, q = student_embs
    g, qq = _spread(emb, q, copies=15)  # 380 student embeddings + jittered copies: 6080 vectors
    k = 10
    _, _, full = _numpy_topk(g, qq, k)
    index, params = faiss_index.build(g, kind)
    if kind.startswith("ivf"):
        assert 1 < params["nprobe"] < params["nlist"], params  # a real (non-exhaustive) IVF search
    D, I = faiss_index.search(index, kind, qq, k)
    r = _tie_aware_recall(I, full, k, tol=1e-6)
    assert r >= threshold, f"{kind}: recall@10 {r:.3f} < {threshold}"
    # scores are inner products (hnsw's L2 distances converted back)
    exact = np.take_along_axis(full, I, 1)
    assert np.abs(D - exact).max() < (0.02 if kind != "ivfpq" else 0.15)
    if kind in faiss_index.RERANKABLE:  # exact re-ranking of a 4k shortlist, rows read from disk
        from mcad.search.store import VectorFile

        np.save(tmp_path / "v.npy", g)
        vf = VectorFile(tmp_path / "v.npy")
        Dr, Ir = faiss_index.search(index, kind, qq, k, rerank=4, vectors=vf)
        rr = _tie_aware_recall(Ir, full, k, tol=1e-6)
        assert rr >= r and (kind != "sq8" or rr >= 0.99), (kind, r, rr)  # IVF types: probing still limits
        np.testing.assert_allclose(Dr, np.take_along_axis(full, Ir, 1), atol=1e-5)
        assert (np.diff(Dr, axis=1) <= 1e-7).all()
        vf.close()
    # round trip through the file format keeps the results
    index2 = faiss.deserialize_index(faiss.serialize_index(index))
    faiss_index.set_search_params(index2, kind, params)
    D2, I2 = faiss_index.search(index2, kind, qq, k)
    np.testing.assert_array_equal(I, I2)


@pytest.fixture()
def photo_dir(tmp_path, synth_root):
    src = sorted((synth_root / "images").glob("test_*.png"))
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    for p in src[:4]:
        shutil.copy(p, d / p.name)
    for p in src[4:6]:
        shutil.copy(p, d / "sub" / p.name.replace(".png", ".PNG"))
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    (d / "notes.txt").write_text("ignored")
    return d, src


def test_index_folder_add_mode_and_unreadable(tiny_run, photo_dir, tmp_path):
    d, src = photo_dir
    out = tmp_path / "idx"
    enc = EagerEncoder(tiny_run, "image")
    s = build_index(out, enc, _scan(d), progress=False)
    assert s["count"] == 6 and s["skipped"] == 1 and s["type"] == "flat"
    assert s["skipped_paths"][0].endswith("broken.jpg")
    assert enc.items == 6  # the broken file never reaches the encoder
    m = store.read_manifest(out)
    assert m["skipped"]["count"] == 1 and "broken.jpg" in m["skipped"]["listed"][0]["path"]
    assert m["student"]["sha256"] == enc.student.sha256 and m["dim"] == 64 and m["count"] == 6
    assert m["encoder"]["kind"] == "eager" and m["index"]["type"] == "flat" and "faiss-cpu" in m["versions"]
    with pytest.raises(SearchError, match="mode=add"):
        build_index(out, enc, _scan(d), progress=False)

    # add 3 new images next to the old ones: only the new ones (and the broken one) are encoded
    for p in src[6:9]:
        shutil.copy(p, d / p.name)
    enc.calls = enc.items = 0
    s = build_index(out, enc, _scan(d), mode="add", progress=False)
    assert s["added"] == 3 and s["count"] == 9 and enc.items == 3 and s["skipped"] == 1
    # nothing new: nothing encoded, nothing rewritten
    enc.calls = enc.items = 0
    gen = store.read_manifest(out)["generation"]
    s = build_index(out, enc, _scan(d), mode="add", progress=False)
    assert s["added"] == 0 and enc.items == 0 and s["skipped"] == 1  # the broken file is retried
    assert store.read_manifest(out)["generation"] == gen
    # the extended index equals a fresh one over the same images
    f = store.load(out, with_embeddings=True)
    fresh, ok, _ = encode_paths(EagerEncoder(tiny_run, "image"), f.paths, progress=False)
    np.testing.assert_allclose(f.embeddings, fresh, atol=1e-6)
    assert f.index.ntotal == 9 and len(set(f.paths)) == 9
    # only the current generation's files remain
    names = sorted(p.name.split(".")[0] for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["embeddings", "index", "manifest", "paths"]


def test_rebuild_and_failed_save_keeps_old_index(tiny_run, photo_dir, tmp_path, monkeypatch):
    d, _ = photo_dir
    out = tmp_path / "idx"
    build_index(out, EagerEncoder(tiny_run, "image"), _scan(d), kind="flat", progress=False)
    before = store.read_manifest(out)
    s = build_index(out, None, [], kind="hnsw", mode="rebuild")
    assert s["type"] == "hnsw" and s["count"] == 6
    assert store.load(out).kind == "hnsw"

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        build_index(out, None, [], kind="sq8", mode="rebuild")
    after = store.load(out)  # still the hnsw generation, complete and readable
    assert after.kind == "hnsw" and after.index.ntotal == 6
    assert before["generation"] < after.manifest["generation"]
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def _scan(d):
    from mcad.search.index import scan_folder

    return scan_folder(d)


def _cli(capsys, *argv):
    from mcad.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_index_search_and_refusals(tiny_run, tokenizer, photo_dir, tmp_path, capsys):
    from conftest import make_run

    d, _ = photo_dir
    out = tmp_path / "idx"
    rc, o, e = _cli(capsys, "index", str(d), f"out={out}", f"run={tiny_run}", "progress=false")
    assert rc == 0, e
    assert "indexed 6 images" in o and "skipped 1 unreadable" in o and "broken.jpg" in o
    text = "a red circle left of a blue square"
    rc, o, e = _cli(capsys, "search", text, f"index={out}", "k=3")
    assert rc == 0, e
    lines = [ln.split() for ln in o.strip().splitlines()]
    assert [ln[0] for ln in lines] == ["1", "2", "3"] and all(Path(ln[2]).exists() for ln in lines)
    rc, o, e = _cli(capsys, "search", text, f"index={out}", "k=4", "--json")
    assert rc == 0, e
    j = json.loads(o)
    assert j["k"] == 4 and len(j["results"]) == 4 and j["type"] == "flat"
    scores = [r["score"] for r in j["results"]]
    assert scores == sorted(scores, reverse=True)
    # same as numpy brute force over the stored embeddings (ties aside)
    f = store.load(out, with_embeddings=True)
    from mcad.search.encoders import load_text_encoder

    tenc, tok = load_text_encoder(run=tiny_run)
    qv = tenc(tok.encode_batch([text]))
    _, _, full = _numpy_topk(f.embeddings, qv, 4)
    np.testing.assert_allclose(scores, -np.sort(-full[0])[:4], atol=2e-6)
    assert _tie_aware_recall(np.array([[r["id"] for r in j["results"]]]), full, 4, 2e-6) == 1.0

    # another student: refused, one clear line, for search and for add
    other = make_run(tmp_path / "other", tokenizer, seed=1)
    rc, o, e = _cli(capsys, "search", text, f"index={out}", f"run={other}")
    assert rc == 1 and "built with student" in e and str(other) in e and len(e.strip().splitlines()) == 1
    rc, o, e = _cli(capsys, "index", str(d), f"out={out}", f"run={other}", "mode=add", "progress=false")
    assert rc == 1 and "built with student" in e
    # another dimension (manifest made to claim that student's sha): refused on dim
    wide = _make_run_dim(tmp_path / "wide", tokenizer, 32)
    from mcad.io import sha256_file, write_json

    m = store.read_manifest(out)
    m["student"]["sha256"] = sha256_file(wide / "student.safetensors")
    write_json(out / "manifest.json", m)
    rc, o, e = _cli(capsys, "search", text, f"index={out}", f"run={wide}")
    assert rc == 1 and "dim 64" in e and "32" in e
    # bad input: one line each
    rc, o, e = _cli(capsys, "search", text, f"index={tmp_path / 'nope'}")
    assert rc == 1 and "no such index folder" in e
    rc, o, e = _cli(capsys, "index", str(tmp_path / "empty_dir_missing"), f"out={tmp_path / 'x'}", f"run={tiny_run}")
    assert rc == 1 and "no such image folder" in e
    rc, o, e = _cli(capsys, "search", text, f"index={out}", "bogus=1")
    assert rc == 1 and "bogus: unknown key" in e


def _make_run_dim(path, tokenizer, dim):
    import torch

    from mcad.models.checkpoint import save_model
    from mcad.models.registry import create_model, with_tokenizer

    torch.manual_seed(0)
    model = create_model("student-tiny", **with_tokenizer({"embed_dim": dim}, tokenizer)).eval()
    path.mkdir(parents=True, exist_ok=True)
    save_model(model, path / "student.safetensors")
    tokenizer.save(path / "tokenizer.json")
    return path


def test_dataset_source_and_auto_type(tiny_run, synth_root, tmp_path, capsys):
    out = tmp_path / "synth_idx"
    rc, o, e = _cli(capsys, "index", "data=synthetic", "split=test", f"data_root={synth_root}", f"out={out}",
                    f"run={tiny_run}", "type=ivfsq8", "progress=false")
    assert rc == 0, e
    m = store.read_manifest(out)
    assert m["count"] == 100 and m["index"]["type"] == "ivfsq8" and m["index"]["chosen_by"] == "flag"
    assert m["sources"] == [{"kind": "data", "data": "synthetic", "split": "test"}]
    rc, o, e = _cli(capsys, "search", "a red circle above a green square", f"index={out}", "k=5", "nprobe=2", "--json")
    assert rc == 0, e
    j = json.loads(o)
    assert len(j["results"]) == 5 and j["rerank"] == 4  # lossy type + kept embeddings: exact re-ranking
    rc, o, e = _cli(capsys, "search", "a red circle above a green square", f"index={out}", "rerank=0", "--json")
    assert rc == 0 and json.loads(o)["rerank"] == 0
    assert faiss_index.auto_type(1000, 64) == "flat" and faiss_index.auto_type(1_000_000, 64) == "ivfsq8"


def test_onnx_encoders(tokenizer, synth_root, photo_dir, tmp_path):
    """Index with an exported ONNX image encoder, query with the ONNX text encoder."""
    pytest.importorskip("onnxruntime")
    import torch

    from conftest import make_run
    from mcad.io import sha256_file, write_json
    from mcad.runs import load_student

    run = make_run(tmp_path / "runs" / "onnxrun", tokenizer, seed=3)
    model, tok = load_student(run)
    exp = run / "export" / "cpu"
    exp.mkdir(parents=True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.image_encoder(), (torch.randn(2, 3, 64, 64),), str(exp / "image_encoder.onnx"),
                          input_names=["pixels"], output_names=["emb"], opset_version=18, dynamo=False,
                          dynamic_axes={"pixels": {0: "b"}, "emb": {0: "b"}})
        torch.onnx.export(model.text_encoder(), (torch.zeros(1, 24, dtype=torch.long),), str(exp / "text_encoder.onnx"),
                          input_names=["ids"], output_names=["emb"], opset_version=18, dynamo=False)
    from mcad.artifacts import Artifact, ExportManifest, Tensor

    arts = []
    for name, role, shape, dtype in (("image_encoder.onnx", "image", ["N", 3, 64, 64], "float32"),
                                     ("text_encoder.onnx", "text", [1, 24], "int64")):
        arts.append(Artifact(name.split(".")[0], role, "onnxruntime", "onnx", name, (exp / name).stat().st_size,
                             sha256_file(exp / name), "fp32", [Tensor("x", shape, dtype)],
                             [Tensor("emb", [1, 64], "float32")]))
    write_json(exp / "manifest.json", ExportManifest(  # the type mcad.export writes
        target="cpu", run=str(run), model="student-tiny", embed_dim=64, context_length=24, image_size=64,
        image_mean=list(model.image_mean), image_std=list(model.image_std), tokenizer="tokenizer.json",
        student_sha256=sha256_file(run / "student.safetensors"), artifacts=arts).to_json())
    d, _ = photo_dir
    out = tmp_path / "idx_onnx"
    from mcad.search.encoders import ArtifactEncoder

    enc = ArtifactEncoder(exp / "image_encoder.onnx", "image")
    build_index(out, enc, _scan(d), progress=False)
    m = store.read_manifest(out)
    assert m["encoder"]["runtime"] == "onnxruntime" and m["student"]["sha256"] == sha256_file(run / "student.safetensors")
    eager, _, _ = encode_paths(EagerEncoder(run, "image"), store.load(out).paths, progress=False)
    onnx = store.load(out, with_embeddings=True).embeddings
    assert (np.sum(eager * onnx, 1) > 0.9999).all()
    # the text side: ONNX encoder, tokenizer from the run folder, same student -> accepted
    s_onnx = Searcher(out, encoder=exp / "text_encoder.onnx")  # fixed batch 1: batches are split
    s_eager = Searcher(out, run=run)
    qs = ["a red circle left of a blue square", "a green cross above a white box"]
    np.testing.assert_allclose(s_onnx.encode(qs), s_eager.encode(qs), atol=1e-5)
    # a role mismatch and a changed artifact are refused
    with pytest.raises(SearchError, match="text artifact"):
        ArtifactEncoder(exp / "text_encoder.onnx", "image")
    with open(exp / "text_encoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(SearchError, match="sha256 differs"):
        Searcher(out, encoder=exp / "text_encoder.onnx")
    # a manifest of an older version: refused with the command that rebuilds it
    old = json.loads((exp / "manifest.json").read_text())
    del old["version"]
    write_json(exp / "manifest.json", old)
    with pytest.raises(SearchError, match=rf"version absent .*rebuild it: `make export TARGET=cpu RUN={run}`"):
        ArtifactEncoder(exp / "image_encoder.onnx", "image")
