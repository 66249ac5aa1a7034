"""The runner's two-stage gallery (dtype=pq4: 4-bit PQ fast-scan codes, then exact re-rank of the best
`depth` from the fp32 rows on disk) against exact fp32 search: the same top-k where the answer is
unambiguous, its recall on a seeded structured gallery, and the same answers after photos are added
and removed on the device."""
from __future__ import annotations

import numpy as np
import pytest

from mcad.device.runner import RunnerError, Scorer

K = 10


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _exact(rows, ids, q, k=K):
    """Exact fp32 top-k ids (ties by id) of one query over the live rows."""
    s = rows @ q
    order = np.lexsort((ids, -s))[:k]
    return ids[order]


def _clear_gallery(n_groups=40, per=12, far=2000, dim=64, seed=0):
    """Queries each with `per` rows close to it (cosine > 0.95) and `far` rows around unrelated centres
    (cosine to any query well under 0.6): every query's exact top-10 is unambiguous."""
    rng = np.random.default_rng(seed)
    q = _unit(rng.standard_normal((n_groups, dim)))
    near = _unit(np.repeat(q, per, 0) + 0.25 / np.sqrt(dim) * rng.standard_normal((n_groups * per, dim)))
    other = np.repeat(_unit(rng.standard_normal((-(-far // 20), dim))), 20, 0)[:far]
    rest = _unit(other + 0.6 / np.sqrt(dim) * rng.standard_normal((far, dim)))
    rows = np.concatenate([near, rest])[rng.permutation(n_groups * per + far)]
    return rows.astype(np.float32), q


def _scorer(tmp_path, rows, **gallery):
    f = tmp_path / "rows.npy"
    np.save(f, rows)
    return Scorer("faiss", dict({"n": len(rows), "file": str(f), "dtype": "pq4"}, **gallery), K, rows.shape[1])


def test_pq4_top_k_is_exact_where_the_answer_is_clear(tmp_path):
    rows, q = _clear_gallery()
    sc = _scorer(tmp_path, rows, depth=50)
    ids = np.arange(len(rows))
    assert sc.n == len(rows) and sc.depth == 50
    for qi in q:
        assert sc.search(qi).tolist() == _exact(rows, ids, qi).tolist()
    # what it holds: packed codes (a small gallery: dim/2 sub-quantizers of 4 bits, dim / 4 bytes per row,
    # in blocks of 32), the codebooks (16 centroids of 2 dimensions each), the id map
    d = rows.shape[1]
    assert sc.two.base.M == d // 2
    assert sc.bytes() == -(-len(rows) // 32) * 32 * d // 4 + (d // 2) * 16 * 2 * 4 + len(rows) * 8


@pytest.mark.parametrize("gallery, pq_m, depth", [
    ({}, 32, 200),                            # 2040 rows of 16 B: the finest code fits the default budget
    ({"code_mb": 0.02}, 16, 200),             # 32 KB would not hold 16 B a row, 8 B fits
    ({"code_mb": 0.001}, 8, 200),             # nothing fits: the coarsest
    ({"pq_m": 16, "depth": 64}, 16, 64),      # given
])
def test_pq4_defaults_follow_the_code_budget(tmp_path, gallery, pq_m, depth):
    rows, _ = _clear_gallery(n_groups=20, far=1800)
    sc = _scorer(tmp_path, rows, **gallery)
    assert (sc.two.base.M, sc.depth) == (pq_m, depth)


def test_pq4_recall_on_a_seeded_structured_gallery(tmp_path):
    """The study's `events` gallery (photos in events around themes, queries with a modality gap) at
    D = 256: recall@10 against exact fp32 search >= 0.99 at the default depth."""
    from two_stage_scan import Gallery

    gal = Gallery("events", 20000, 256, 0, 200, 50)
    rows = np.concatenate(list(gal.rows()))
    q = gal.queries(50)
    sc = _scorer(tmp_path, rows)
    truth = [set(t.tolist()) for t in np.argsort(-(q @ rows.T), axis=1, kind="stable")[:, :K]]
    recall = np.mean([len(set(sc.search(qi).tolist()) & t) / K for qi, t in zip(q, truth)])
    assert recall >= 0.99, recall
    sc.two.depth = K  # the codes' own top-10, re-ranked among themselves only
    recall_codes = np.mean([len(set(sc.search(qi).tolist()) & t) / K for qi, t in zip(q, truth)])
    assert recall_codes < 0.9, recall_codes  # the codes alone are coarse: the re-rank is what makes it exact


def test_pq4_add_and_remove_stay_exact(tmp_path):
    """Photos added (near some queries) and removed (some of the current top-10s) on the device: the
    answers equal exact search over the rows that are left, through removals that leave a part-filled
    last block of codes and adds after them."""
    rows, q = _clear_gallery(n_groups=20, per=12, far=985)  # 1225 rows: the last block of 32 part-filled
    sc = _scorer(tmp_path, rows, depth=60)
    live_rows, live_ids = rows, np.arange(len(rows))
    rng = np.random.default_rng(3)
    for step in range(3):
        drop = np.concatenate([sc.search(q[step])[:4], rng.choice(live_ids, 7, replace=False)])
        assert sc.remove(drop) == len(np.unique(drop))
        keep = ~np.isin(live_ids, drop)
        live_rows, live_ids = live_rows[keep], live_ids[keep]
        new = _unit(np.repeat(q[step:step + 2], 3, 0) + 0.1 / 8 * rng.standard_normal((6, rows.shape[1])))
        added = sc.add(new)
        assert added.tolist() == list(range(len(rows) + 6 * step, len(rows) + 6 * step + 6))
        live_rows, live_ids = np.concatenate([live_rows, new]), np.concatenate([live_ids, added])
        assert sc.n == len(live_ids)
        for qi in q:
            assert sc.search(qi).tolist() == _exact(live_rows, live_ids, qi).tolist()
    assert sc.remove([10**9]) == 0 and sc.remove([]) == 0


def test_pq4_codes_after_remove_then_add_are_the_fresh_index_codes(tmp_path):
    """faiss's fast-scan remove_ids leaves stale codes in the last block's free slots; the runner clears
    them, so rows added after a removal score as in an index built fresh from the same rows."""
    import faiss

    rows, q = _clear_gallery(n_groups=10, per=12, far=880)  # 1000 rows: 1000 % 32 = 8
    sc = _scorer(tmp_path, rows, depth=60)
    sc.remove(np.arange(0, 30, 10))
    new = _unit(np.random.default_rng(5).standard_normal((40, rows.shape[1])))
    sc.add(new)
    fresh = faiss.clone_index(sc.two.base)
    fresh.reset()
    fresh.add(np.concatenate([np.delete(rows, [0, 10, 20], 0), new]))
    d_got, _ = sc.two.base.search(np.concatenate([q, new[:10]]), 50)
    d_ref, _ = fresh.search(np.concatenate([q, new[:10]]), 50)
    np.testing.assert_array_equal(d_got, d_ref)


@pytest.mark.parametrize("gallery, dim, match", [
    ({"file": None, "seed": 0}, 64, "gallery dtype pq4 re-ranks from the fp32 rows on disk: give gallery.file"),
    ({"depth": 5}, 64, r"gallery depth=5, pq_m=32: need depth >= k \(10\)"),
    ({"pq_m": 7}, 64, "pq_m dividing the embedding size 64"),
    ({}, 32, r"rows.npy: the re-rank rows must be a C-ordered float32 \[N, 32\] .npy"),
    ({"dtype": "pq8"}, 64, "gallery dtype 'pq8': expected one of fp32, fp16, int8, pq4"),
])
def test_pq4_bad_gallery_is_one_line(tmp_path, gallery, dim, match):
    rows, _ = _clear_gallery(n_groups=2, far=200)
    f = tmp_path / "rows.npy"
    np.save(f, rows)
    g = dict({"n": len(rows), "file": str(f), "dtype": "pq4"}, **gallery)
    with pytest.raises(RunnerError, match=match) as e:
        Scorer("faiss", g, K, dim)
    assert "\n" not in str(e.value)


def test_updates_bad_input_is_one_line(tmp_path):
    rows, _ = _clear_gallery(n_groups=2, far=200)
    sc = _scorer(tmp_path, rows)
    with pytest.raises(RunnerError, match=r"rows to add: expected float \[m, 64\], got float32 \(3, 32\)"):
        sc.add(np.zeros((3, 32), np.float32))
    with pytest.raises(RunnerError, match=r"rows to add: expected float \[m, 64\], got int64 \(64,\)"):
        sc.add(np.zeros(64, np.int64))
    int8 = Scorer("faiss", {"n": len(rows), "file": str(tmp_path / "rows.npy"), "dtype": "int8"}, K, 64)
    with pytest.raises(RunnerError, match="gallery dtype 'int8' is built once; .* is dtype=pq4"):
        int8.add(rows[:2])


def test_pq4_build_gives_faiss_own_codes(tmp_path):
    """The runner sizes the codes and ids before it streams the rows in (no doubling copies at build):
    the codes are byte for byte those of faiss's own add() of the same rows."""
    import faiss

    rows, _ = _clear_gallery(n_groups=5, far=1500)  # 1560 rows, not a multiple of the block of 32
    sc = _scorer(tmp_path, rows)
    ref = faiss.clone_index(sc.two.base)
    ref.reset()
    ref.add(rows)
    got, want = sc.two.base, ref
    assert (got.ntotal, got.ntotal2, got.codes.size()) == (want.ntotal, want.ntotal2, want.codes.size())
    assert bytes(faiss.rev_swig_ptr(got.codes.get(), got.codes.size())) == bytes(
        faiss.rev_swig_ptr(want.codes.get(), want.codes.size()))
    assert faiss.vector_to_array(sc.index.id_map).tolist() == list(range(len(rows)))


def _onnx_encoder(path, table):
    """A tiny text encoder as ONNX: ids [1, L] -> the mean of their rows of `table`, unit length."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("ReduceMean", ["e", "axes"], ["m"], keepdims=0),
             helper.make_node("LpNormalization", ["m"], ["emb"], axis=-1, p=2)]
    graph = helper.make_graph(nodes, "enc", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [1, table.shape[1]])],
                              [numpy_helper.from_array(table, "table"),
                               numpy_helper.from_array(np.array([1], np.int64), "axes")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)


def test_search_job_with_a_pq4_gallery(tmp_path):
    """The job spec the bench passes: gallery {n, file, dtype: pq4, depth}; the job records the depth
    and the bytes the codes hold, and its top-10 are exact search's."""
    from mcad.device.runner import run_job

    rows, q = _clear_gallery(n_groups=8, far=1500)
    np.save(tmp_path / "rows.npy", rows)
    table = np.concatenate([q, q]).astype(np.float32)  # token t and t + 8 embed as query t
    _onnx_encoder(str(tmp_path / "enc.onnx"), table)
    ids = np.array([[3, 11, 3]], np.int64)
    np.save(tmp_path / "ids.npy", ids)
    spec = {"mode": "search", "runtime": "onnxruntime", "model": str(tmp_path / "enc.onnx"),
            "ids": str(tmp_path / "ids.npy"),
            "gallery": {"n": len(rows), "file": str(tmp_path / "rows.npy"), "dtype": "pq4", "depth": 40},
            "warmup": 1, "min_runs": 3, "max_runs": 3, "min_time_s": 0}
    res = run_job(spec)
    assert res["gallery"]["dtype"] == "pq4" and res["gallery"]["depth"] == 40 and res["gallery"]["n"] == len(rows)
    assert res["gallery"]["bytes"] < len(rows) * rows.shape[1]  # under the int8 gallery's 1 B a dimension
    assert res["top_ids_last"] == _exact(rows, np.arange(len(rows)), q[3]).tolist()
    assert res["stages"]["score_topk"]["n"] == 3
