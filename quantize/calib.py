"""Calibration and held-out sets drawn from a Karpathy-format data set (the training split by
default), preprocessed exactly as the model sees them: normalised pixels and token ids."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("mcad.quantize")

DEFAULT_ROOT = Path("data/synth")  # the embedded default (mcad.data.spec names its file)


@dataclass
class Samples:
    """pixels float32 [N,3,S,S] (normalised), ids int64 [M,L]; one caption per image unless
    `captions_per_image` says otherwise; `caption_to_image` int64 [M]."""
    pixels: np.ndarray
    ids: np.ndarray
    caption_to_image: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.pixels)


def resolve_data(data: str | Path | None) -> Path:
    """The Karpathy JSON of a data root or file (default: the embedded synthetic set)."""
    from mcad.data.spec import synth_json

    p = Path(data) if data is not None else synth_json(DEFAULT_ROOT)
    if p.is_dir():
        cands = sorted(p.glob("dataset_*.json"))
        if not cands:
            raise FileNotFoundError(f"{p}: no dataset_*.json in the data folder (run `make data`)")
        p = cands[0]
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such data set (run `make data`, or pass data=<Karpathy JSON>)")
    return p


def load_samples(model, tokenizer, data: str | Path | None = None, n: int = 256, split: str = "train",
                 seed: int = 0, captions_per_image: int = 1, progress: bool = False) -> Samples:
    """`n` images (a seeded random draw from `split`) and `captions_per_image` of their captions
    (all of them with captions_per_image=0), as the student's inputs."""
    from mcad.data.images import load_images, normalize
    from mcad.data.karpathy import load_karpathy

    path = resolve_data(data)
    corpus = load_karpathy(path, split=split)
    if n and n < corpus.n_images:
        rng = np.random.default_rng(seed)
        keep = set(rng.choice(corpus.n_images, size=n, replace=False).tolist())
        corpus = corpus.drop_images(set(range(corpus.n_images)) - keep)
    pixels_u8, corpus = load_images(corpus, model.image_size, progress=progress, view=getattr(model, "view", None))
    pixels = normalize(pixels_u8, model.image_mean, model.image_std).numpy().astype(np.float32)
    caps, c2i = [], []
    for img, cids in enumerate(corpus.image_captions()):
        take = cids if captions_per_image <= 0 else cids[:captions_per_image]
        caps += [corpus.captions[c] for c in take]
        c2i += [img] * len(take)
    ids = tokenizer.encode_batch(caps)
    log.info("%s: %d images, %d captions from split %s of %s", "samples", len(pixels), len(ids), split, path)
    return Samples(pixels, ids, np.asarray(c2i, dtype=np.int64), f"{path}:{split}")
