"""Batches as pure functions of (seed, step), so data order is reproducible and resume is exact.

`ConfuserBatches` fills each batch with anchors and their nearest neighbours under a teacher (the
images the dual teacher confuses with them), so that hard negatives are in the batch: with random
batches the colour- and relation-swapped confusers almost never meet."""
from __future__ import annotations

import numpy as np
import torch


class RandomBatches:
    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.per_epoch = max(1, n // self.batch_size)

    def __call__(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return perm[k * self.batch_size:(k + 1) * self.batch_size]


class ConfuserBatches:
    """batch = anchors + for each anchor its `group - 1` nearest neighbours (deduplicated, topped up
    with random images)."""

    def __init__(self, neighbours: np.ndarray, batch_size: int, seed: int, group: int = 4):
        self.nb = np.asarray(neighbours)
        self.n = len(self.nb)
        self.batch_size, self.seed, self.group = min(batch_size, self.n), seed, group
        self.anchors = RandomBatches(self.n, max(1, self.batch_size // group), seed)

    def __call__(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step, 7])
        out: list[int] = []
        seen: set[int] = set()
        for a in self.anchors(step):
            for i in [int(a), *self.nb[a, : self.group - 1].tolist()]:
                if i not in seen and len(out) < self.batch_size:
                    seen.add(i)
                    out.append(i)
        while len(out) < self.batch_size:
            i = int(rng.integers(self.n))
            if i not in seen:
                seen.add(i)
                out.append(i)
        return np.array(out, dtype=np.int64)


def nearest_neighbours(emb: torch.Tensor, k: int, chunk: int = 8192, keys: np.ndarray | None = None) -> np.ndarray:
    """k nearest rows by inner product, excluding each row itself. emb: [N, D] unit vectors.
    With `keys`, rows with the row's own key are excluded too: an image with the same description
    is a duplicate, not a confuser (on the synthetic benchmark ~6 images share each scene, and
    without this 65% of the neighbours were such duplicates, about which no teacher can say anything).

    Exact search with faiss (IndexFlatIP), `chunk` queries at a time: memory stays O(chunk * k), not
    the N x N (or chunk x N) similarity matrix (COCO's 113k images: 51 GB as one matrix). Each query
    asks for k + the largest key group (itself included), which always leaves k others."""
    import faiss

    x = np.ascontiguousarray(torch.as_tensor(emb).float().cpu().numpy())
    n = len(x)
    key = np.arange(n) if keys is None else np.asarray(keys)
    group = int(np.unique(key, return_counts=True)[1].max()) if n else 1
    want = min(n, k + group)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    out = np.empty((n, k), dtype=np.int64)
    for s in range(0, n, chunk):
        sims, ids = index.search(x[s:s + chunk], want)
        for r, (row_ids, row_sims) in enumerate(zip(ids, sims)):
            out[s + r] = _keep_others(s + r, row_ids, row_sims, key, k)
    return out


def _keep_others(i: int, ids: np.ndarray, sims: np.ndarray, key: np.ndarray, k: int) -> np.ndarray:
    """The first k of a ranked row that are not i and not of i's key, ties in index order (as a
    stable sort of the similarities would give). Rows of a set too small to have k others are
    topped up with the excluded ones (same key, then i itself), as a brute-force top-k would."""
    ok = ids >= 0
    ids, sims = ids[ok], sims[ok]
    order = np.lexsort((ids, -sims))  # by similarity, then index: ties do not depend on faiss's order
    ids = ids[order]
    others = ids[(ids != i) & (key[ids] != key[i])]
    if len(others) >= k:
        return others[:k]
    rest = [j for j in ids.tolist() if j != i and j not in set(others.tolist())] + [i]
    return np.array((others.tolist() + rest)[:k], dtype=np.int64)


def caption_choice(n_images: int, image_captions: list[list[int]], seed: int, step: int, idx: np.ndarray) -> np.ndarray:
    """One caption per image of the batch, drawn by (seed, step)."""
    rng = np.random.default_rng([seed, step, 11])
    return np.array([image_captions[i][rng.integers(len(image_captions[i]))] for i in idx], dtype=np.int64)
