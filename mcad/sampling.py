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


@torch.no_grad()
def nearest_neighbours(emb: torch.Tensor, k: int, chunk: int = 2048, keys: np.ndarray | None = None) -> np.ndarray:
    """k nearest rows by inner product, excluding each row itself. emb: [N, D] unit vectors.
    With `keys`, rows with the row's own key are excluded too: an image with the same description
    is a duplicate, not a confuser (on the synthetic benchmark ~6 images share each scene, and
    without this 65% of the neighbours were such duplicates, about which no teacher can say anything)."""
    kt = None if keys is None else torch.as_tensor(np.asarray(keys))
    out = []
    for s in range(0, len(emb), chunk):
        sim = emb[s:s + chunk] @ emb.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -torch.inf
        if kt is not None:
            sim[kt[s:s + chunk, None] == kt[None, :]] = -torch.inf
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out).numpy()


def caption_choice(n_images: int, image_captions: list[list[int]], seed: int, step: int, idx: np.ndarray) -> np.ndarray:
    """One caption per image of the batch, drawn by (seed, step)."""
    rng = np.random.default_rng([seed, step, 11])
    return np.array([image_captions[i][rng.integers(len(image_captions[i]))] for i in idx], dtype=np.int64)
