"""Image decoding and preprocessing with PIL/numpy/torch only (no torchvision)."""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mcad.data.corpus import Corpus

log = logging.getLogger("mcad.data")

# The synthetic benchmark and our models use symmetric [-1, 1] scaling; real teachers bring theirs.
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


def decode_image(src: str | Path | bytes, size: int) -> np.ndarray:
    """Decode, centre-crop to square and resize (bicubic) to `size`; returns uint8 [3, size, size]."""
    f = io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src
    with Image.open(f) as im:
        im.load()
        im = im.convert("RGB")
    w, h = im.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


def load_images(corpus: Corpus, size: int, cache_dir: str | Path | None = None,
                progress: bool = True) -> tuple[np.ndarray, Corpus]:
    """Decode every image of the corpus. Unreadable images are reported (file + error) and dropped
    with their captions; the returned corpus is re-indexed to match the array.

    With `cache_dir`, the decoded array is kept as .npy keyed by the image list and size."""
    cache = None
    if cache_dir is not None:
        key = hashlib.sha256(("\n".join(corpus.image_paths) + f"|{size}").encode()).hexdigest()[:16]
        cache = Path(cache_dir) / f"pixels_{corpus.split}_{size}_{key}.npz"
        if cache.exists():
            with np.load(cache) as z:
                bad = set(z["bad"].tolist())
                for i in sorted(bad):
                    corpus.report.add(corpus.image_paths[i], "unreadable image (cached finding)")
                return z["pixels"], corpus.drop_images(bad)
    out = np.zeros((corpus.n_images, 3, size, size), dtype=np.uint8)
    bad: set[int] = set()
    for i, p in enumerate(tqdm(corpus.image_paths, desc=f"decode {corpus.split} images", unit="img",
                               disable=not progress, leave=False)):
        try:
            out[i] = decode_image(p, size)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
            corpus.report.add(p, f"unreadable image ({type(e).__name__}: {e})")
            bad.add(i)
    if cache is not None:
        from mcad.io import atomic_path

        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, pixels=out, bad=np.array(sorted(bad), dtype=np.int64))
    keep = [i for i in range(corpus.n_images) if i not in bad]
    return out[keep], corpus.drop_images(bad)


def normalize(pixels_uint8, mean=DEFAULT_MEAN, std=DEFAULT_STD):
    """uint8 [B,3,H,W] (numpy or torch) -> float32 torch tensor, standardised per channel."""
    import torch

    x = torch.as_tensor(pixels_uint8).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
