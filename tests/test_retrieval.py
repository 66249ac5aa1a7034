"""Retrieval metrics against brute-force references written differently: full sorts per row in
plain Python with pessimistic tie-breaking, on matrices with many ties."""
from __future__ import annotations

import numpy as np
import pytest

from mcad.retrieval import KS, ranks, recall_table, rerank_metrics, retrieval_metrics


def first_hit(order: list[int], is_pos) -> int:
    for r, j in enumerate(order):
        if is_pos(j):
            return r
    return len(order)


def ref_ranks(sim: np.ndarray, c2i: list[int]) -> tuple[list[int], list[int]]:
    """Sort every row completely; among equal scores the wrong items go first (pessimistic)."""
    n_img, n_txt = sim.shape
    s = sim.tolist()
    i2t = []
    for i in range(n_img):
        order = sorted(range(n_txt), key=lambda j: (-s[i][j], c2i[j] == i))
        i2t.append(first_hit(order, lambda j: c2i[j] == i))
    t2i = []
    for j in range(n_txt):
        order = sorted(range(n_img), key=lambda i: (-s[i][j], i == c2i[j]))
        t2i.append(first_hit(order, lambda i: i == c2i[j]))
    return i2t, t2i


def ref_metrics(i2t: list[int], t2i: list[int]) -> dict[str, float]:
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in KS:
            out[f"{name}_r{k}"] = 100.0 * sum(1 for x in r if x < k) / len(r)
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in KS)
    return out


def assert_metrics_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-9), k


def uneven_c2i(rng, n_img: int, lo: int = 1, hi: int = 7, shuffle: bool = True) -> np.ndarray:
    counts = rng.integers(lo, hi + 1, size=n_img)
    c2i = np.repeat(np.arange(n_img), counts)
    if shuffle:
        rng.shuffle(c2i)
    return c2i


CASES = [
    # (n_img, captions: "5" = five per image, "uneven" = 1..7 shuffled, levels of the integer sims)
    (1, "5", 3), (3, "5", 2), (8, "5", 4), (25, "5", 3), (40, "5", 50),
    (6, "uneven", 2), (17, "uneven", 3), (33, "uneven", 6), (12, "uneven", 1000),
]


@pytest.mark.parametrize("n_img,caps,levels", CASES)
def test_ranks_match_brute_force_with_ties(n_img, caps, levels):
    rng = np.random.default_rng(n_img * 1000 + levels)
    c2i = np.repeat(np.arange(n_img), 5) if caps == "5" else uneven_c2i(rng, n_img)
    sim = rng.integers(0, levels, size=(n_img, len(c2i))).astype(np.float32)
    want_i2t, want_t2i = ref_ranks(sim, c2i.tolist())
    i2t, t2i = ranks(sim, c2i)
    assert i2t.tolist() == want_i2t and t2i.tolist() == want_t2i
    i2t_c, t2i_c = ranks(sim, c2i, chunk=3)  # chunked path gives the same
    assert i2t_c.tolist() == want_i2t and t2i_c.tolist() == want_t2i
    assert_metrics_equal(retrieval_metrics(sim, c2i), ref_metrics(want_i2t, want_t2i))


def test_float_and_torch_inputs():
    import torch

    rng = np.random.default_rng(0)
    c2i = uneven_c2i(rng, 20)
    sim = rng.normal(size=(20, len(c2i))).astype(np.float32)
    sim[:, ::3] = np.round(sim[:, ::3], 1)  # some ties
    want = ref_metrics(*ref_ranks(sim, c2i.tolist()))
    assert_metrics_equal(retrieval_metrics(sim.astype(np.float64), c2i), want)
    assert_metrics_equal(retrieval_metrics(torch.from_numpy(sim), torch.from_numpy(c2i)), want)
    assert_metrics_equal(retrieval_metrics(sim, c2i.tolist()), want)


def test_constant_and_perfect_models():
    n_img = 10
    c2i = np.repeat(np.arange(n_img), 5)
    i2t, t2i = ranks(np.zeros((n_img, 50), np.float32), c2i)
    assert (i2t == 45).all() and (t2i == n_img - 1).all()  # every tie resolved against us
    perfect = (np.arange(n_img)[:, None] == c2i[None, :]).astype(np.float32)
    m = retrieval_metrics(perfect, c2i)
    assert m["rsum"] == 600.0
    nan = retrieval_metrics(np.full((n_img, 50), np.nan, np.float32), c2i)
    assert nan["i2t_r10"] == 0.0 and nan["t2i_r1"] == 0.0  # a diverged model scores nothing
    half = perfect.copy()
    half[:, ::2] = np.nan  # NaN on positives never hits; NaN on negatives ranks ahead
    pos, isnan = perfect.astype(bool), np.isnan(half)
    as_worst = np.where(isnan & pos, -1.0, np.where(isnan, 2.0, half))  # below / above every score
    got = ranks(half, c2i)
    want = ref_ranks(as_worst, c2i.tolist())
    assert got[0].tolist() == want[0] and got[1].tolist() == want[1]


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="caption_to_image"):
        ranks(np.zeros((3, 10)), np.zeros(9, dtype=np.int64))


# --------------------------------------------------------------------------------------------
# re-ranking


def ref_rerank_ranks(sim: np.ndarray, c2i: list[int], score, k: int) -> tuple[list[int], list[int]]:
    """Per row: the top k by sim, re-sorted by `score(img, txt)` (pessimistic ties), then the rest
    in their sim order."""
    n_img, n_txt = sim.shape
    s = sim.tolist()
    i2t = []
    for i in range(n_img):
        by_sim = sorted(range(n_txt), key=lambda j: (-s[i][j], c2i[j] == i))
        top, rest = by_sim[:k], by_sim[k:]
        top = sorted(top, key=lambda j: (-score(i, j), c2i[j] == i))
        i2t.append(first_hit(top + rest, lambda j: c2i[j] == i))
    t2i = []
    for j in range(n_txt):
        by_sim = sorted(range(n_img), key=lambda i: (-s[i][j], i == c2i[j]))
        top, rest = by_sim[:k], by_sim[k:]
        top = sorted(top, key=lambda i: (-score(i, j), i == c2i[j]))
        t2i.append(first_hit(top + rest, lambda i: i == c2i[j]))
    return i2t, t2i


def make_scorer(kind: str, c2i: np.ndarray, seen: list):
    def vec(img, txt):
        img, txt = np.asarray(img), np.asarray(txt)
        assert img.shape == txt.shape and img.ndim == 1
        seen.append((img.copy(), txt.copy()))
        if kind == "oracle":
            return (c2i[txt] == img).astype(np.float32)
        if kind == "ties":
            return ((img * 7 + txt * 3) % 3).astype(np.float32)  # integer scores: many ties
        return np.sin(img * 1.3 + txt * 0.7).astype(np.float32)

    def one(i, j):
        return float(vec(np.array([i]), np.array([j]))[0])

    return vec, one


@pytest.mark.parametrize("kind", ["oracle", "ties", "smooth"])
@pytest.mark.parametrize("n_img,caps,k", [(9, "5", 1), (9, "5", 4), (15, "uneven", 5), (6, "5", 100), (12, "uneven", 0)])
def test_rerank_matches_brute_force(kind, n_img, caps, k):
    rng = np.random.default_rng(n_img + k)
    c2i = np.repeat(np.arange(n_img), 5) if caps == "5" else uneven_c2i(rng, n_img)
    n_txt = len(c2i)
    sim = rng.permutation(n_img * n_txt).reshape(n_img, n_txt).astype(np.float32) / (n_img * n_txt)  # no ties
    seen_i2t, seen_t2i, ref_seen = [], [], []
    vec_i2t, _ = make_scorer(kind, c2i, seen_i2t)
    vec_t2i, _ = make_scorer(kind, c2i, seen_t2i)
    _, one = make_scorer(kind, c2i, ref_seen)
    got = rerank_metrics(sim, c2i, vec_i2t, vec_t2i, k)
    want = ref_metrics(*ref_rerank_ranks(sim, c2i.tolist(), one, k))
    assert_metrics_equal(got, want)
    # the re-ranker saw exactly each row's top-k pairs
    ki, kt = min(k, n_txt), min(k, n_img)
    pairs_i2t = {(int(a), int(b)) for img, txt in seen_i2t for a, b in zip(img, txt)}
    want_i2t = {(i, int(j)) for i in range(n_img) for j in np.argsort(-sim[i])[:ki]}
    assert pairs_i2t == want_i2t
    pairs_t2i = {(int(a), int(b)) for img, txt in seen_t2i for a, b in zip(img, txt)}
    want_t2i = {(int(i), j) for j in range(n_txt) for i in np.argsort(-sim[:, j])[:kt]}
    assert pairs_t2i == want_t2i


def test_rerank_with_oracle_fixes_order_within_k():
    n_img = 10
    c2i = np.repeat(np.arange(n_img), 5)
    rng = np.random.default_rng(3)
    sim = rng.normal(size=(n_img, 50)).astype(np.float32)
    base = retrieval_metrics(sim, c2i)

    def oracle(img, txt):
        return (c2i[np.asarray(txt)] == np.asarray(img)).astype(np.float32)

    m = rerank_metrics(sim, c2i, oracle, oracle, k=10)
    # with an oracle, R@1 after re-ranking the top 10 equals R@10 before
    assert m["i2t_r1"] == base["i2t_r10"] and m["t2i_r1"] == base["t2i_r10"]
    assert m["i2t_r10"] == base["i2t_r10"] and m["t2i_r10"] == base["t2i_r10"]


def test_recall_table():
    t = recall_table({"a": {"i2t_r1": 1.0, "rsum": 2.0}})
    assert t.splitlines()[0].startswith("| model | i2t R@1") and "| a | 1.0 |" in t and "nan" in t
