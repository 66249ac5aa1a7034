"""faiss index types over unit embeddings, ranked by inner product (= cosine).

- flat:   IndexFlatIP, exact. 4*D bytes/vector.
- sq8:    IndexScalarQuantizer QT_8bit (per-dimension min/max), brute force over 1-byte codes. D bytes.
- ivfsq8: IndexIVFScalarQuantizer: k-means coarse quantizer (nlist lists, nprobe visited) + 8-bit
          codes of the residual to the list centroid. D + 8 (id) bytes/vector + centroids.
- ivfpq:  IndexIVFPQ: coarse quantizer + product quantization of the residual (m sub-vectors x
          nbits). m*nbits/8 + 8 bytes/vector: the smallest, the least accurate.
- hnsw:   IndexHNSWFlat (M links/node, efSearch at query time). Built with the L2 metric: on unit
          vectors |q-x|^2 = 2 - 2 q.x, so the ranking is the inner-product ranking, and the scores are
          converted back (faiss's inner-product HNSW build is much slower, faiss issue #4756).
          4*D + ~8*M bytes/vector: fast but big.
`auto` picks flat while the float gallery fits in AUTO_FLAT_BYTES, else ivfsq8.

Re-ranking: 8-bit codes cannot order items whose cosines differ by less than ~5e-4, and in a
large gallery the top 10 of a query often sit within a few 1e-3. With the exact embeddings kept
on disk (the index folder's embeddings file), the lossy types take a shortlist of rerank*k from
the index and re-order it with exact scores read by pread (memory stays the index's).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

TYPES = ("flat", "sq8", "ivfsq8", "ivfpq", "hnsw")
RERANKABLE = ("sq8", "ivfsq8", "ivfpq")  # lossy codes: exact re-ranking of a shortlist pays off
DEFAULT_RERANK = 4  # shortlist = 4 x k when the index folder keeps the exact embeddings
AUTO_FLAT_BYTES = 32 << 20  # 32 MiB of float32 (131k x 64-d): small enough that exact search needs no index


def _faiss():
    import faiss

    return faiss


def auto_type(n: int, dim: int) -> str:
    return "flat" if n * dim * 4 <= AUTO_FLAT_BYTES else "ivfsq8"


def default_params(kind: str, n: int, dim: int) -> dict[str, Any]:
    """Parameters for a gallery of n vectors (n = the training set for IVF types)."""
    if kind in ("ivfsq8", "ivfpq"):
        # ~4 sqrt(n) lists, a power of two, with >= 39 training points each (faiss's minimum).
        nlist = 1 << max(0, round(math.log2(max(1.0, 4 * math.sqrt(n)))))
        nlist = int(max(1, min(nlist, n // 39 if n >= 39 else 1, 65536)))
        p: dict[str, Any] = {"nlist": nlist, "nprobe": int(min(nlist, max(16, nlist // 32)))}
        if kind == "ivfpq":
            # <= 32 sub-quantizers of >= 2 dims: faiss trains 1-2-dim sub-quantizers very slowly
            # (d=64, m=64: ~3 min for 1M vectors on 2 cores; m=32: ~30 s)
            m = max(x for x in range(1, dim + 1) if dim % x == 0 and x <= max(1, min(32, dim // 2)))
            nbits = int(min(8, max(4, math.floor(math.log2(max(2, n / 39))))))
            p.update(m=m, nbits=nbits)
        return p
    if kind == "hnsw":
        # text queries sit away from the image cloud (the modality gap): graph search needs a wide beam
        return {"M": 16, "efConstruction": 40, "efSearch": 256}
    return {}


def build(x: np.ndarray, kind: str, params: dict[str, Any] | None = None, train_max: int = 262144,
          seed: int = 0):
    """A trained faiss index over x (unit rows) holding ids 0..n-1; returns (index, params used)."""
    faiss = _faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if kind not in TYPES:
        raise ValueError(f"unknown index type {kind!r} (known: {', '.join(TYPES)}, auto)")
    p = {**default_params(kind, n, d), **(params or {})}
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "sq8":
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, ip)
    elif kind in ("ivfsq8", "ivfpq"):
        q = faiss.IndexFlatIP(d)
        if kind == "ivfsq8":
            index = faiss.IndexIVFScalarQuantizer(q, d, int(p["nlist"]), faiss.ScalarQuantizer.QT_8bit, ip, True)
        else:
            index = faiss.IndexIVFPQ(q, d, int(p["nlist"]), int(p["m"]), int(p["nbits"]), ip)
        index.own_fields = True
        q.this.disown()  # the IVF index frees its quantizer
        index.cp.niter = int(p.get("niter", 10))
        index.cp.max_points_per_centroid = int(p.get("max_points_per_centroid", 64))
        index.cp.seed = seed
        index.nprobe = int(p["nprobe"])
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(p["M"]), faiss.METRIC_L2)
        index.hnsw.efConstruction = int(p["efConstruction"])
        index.hnsw.efSearch = int(p["efSearch"])
    if not index.is_trained:
        tx = x
        if n > train_max:
            tx = x[np.random.default_rng(seed).choice(n, train_max, replace=False)]
        index.train(tx)
    if n:
        index.add(x)
    p["trained_on"] = int(n)
    return index, p


def metric_of(kind: str) -> str:
    return "l2-on-unit" if kind == "hnsw" else "ip"


def set_search_params(index, kind: str, params: dict[str, Any]) -> None:
    faiss = _faiss()
    if kind in ("ivfsq8", "ivfpq") and params.get("nprobe"):
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])
    if kind == "hnsw" and params.get("efSearch"):
        index.hnsw.efSearch = int(params["efSearch"])


def search(index, kind: str, q: np.ndarray, k: int, rerank: int = 0, vectors=None) -> tuple[np.ndarray, np.ndarray]:
    """(scores [B,k] inner products, ids [B,k]); missing results (k > n) are id -1, score -inf.

    rerank=r > 1 with `vectors` (a store.VectorFile of the exact embeddings): take the index's top
    r*k and re-order them by exact inner product (the scores returned are then exact)."""
    q = np.ascontiguousarray(np.atleast_2d(q), dtype=np.float32)
    if rerank and rerank > 1 and vectors is not None and kind in RERANKABLE:
        D, I = search(index, kind, q, k * int(rerank))
        outD = np.full((len(q), k), -np.inf, np.float32)
        outI = np.full((len(q), k), -1, np.int64)
        for r in range(len(q)):
            ids = I[r][I[r] >= 0]
            if not len(ids):
                continue
            s = vectors.rows(ids) @ q[r]
            top = np.argsort(-s, kind="stable")[:k]
            outD[r, :len(top)], outI[r, :len(top)] = s[top], ids[top]
        return outD, outI
    k_eff = int(min(k, index.ntotal)) if index.ntotal else 0
    if k_eff == 0:
        return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
    D, I = index.search(q, k_eff)
    if metric_of(kind) == "l2-on-unit":
        D = 1.0 - D / 2.0
    D = np.where(I < 0, -np.inf, D).astype(np.float32)
    if k_eff < k:
        D = np.pad(D, ((0, 0), (0, k - k_eff)), constant_values=-np.inf)
        I = np.pad(I, ((0, 0), (0, k - k_eff)), constant_values=-1)
    return D, I.astype(np.int64)


def serialized_bytes(index) -> int:
    return int(_faiss().serialize_index(index).nbytes)
