"""Calibration and held-out sets drawn from a data set (any format `data=` takes; the training split
by default), preprocessed exactly as the model sees them: normalised pixels and token ids."""
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


def resolve_data(data) -> "DataSpec":
    """The data set to draw from, as a checked `mcad.data.spec.DataSpec`: None is the embedded
    synthetic set; a path is a Karpathy JSON, a folder holding one (dataset_*.json), a CSV or
    webdataset shards (as `data=` takes them everywhere); a mapping is a run's recorded `data:` spec."""
    from mcad.data.spec import DEFAULT_SYNTH_ROOT, parse, synth_json

    if data is not None and not isinstance(data, (str, Path)):
        data = parse(data)
        if not data.is_default_synth():
            return data
        data = synth_json(data.get("root") or DEFAULT_SYNTH_ROOT)  # read as a Karpathy file, as before specs
    p = Path(data) if data is not None else synth_json(DEFAULT_ROOT)
    if p.is_dir():
        cands = sorted(p.glob("dataset_*.json"))
        if not cands:
            raise FileNotFoundError(f"{p}: no dataset_*.json in the data folder (run `make data`)")
        p = cands[0]
    if "{" not in str(p) and not p.exists():  # (a brace is a shard pattern, expanded by the reader)
        raise FileNotFoundError(f"{p}: no such data set (run `make data`, or pass data=<Karpathy JSON>)")
    return parse(str(p))


def _draw(n_images: int, n: int, seed: int) -> set[int]:
    """The images left out of a seeded draw of `n` (none when n covers them all)."""
    if not n or n >= n_images:
        return set()
    keep = set(np.random.default_rng(seed).choice(n_images, size=n, replace=False).tolist())
    return set(range(n_images)) - keep


def load_samples(model, tokenizer, data=None, n: int = 256, split: str = "train",
                 seed: int = 0, captions_per_image: int = 1, progress: bool = False) -> Samples:
    """`n` images (a seeded random draw from `split` of `data`, any format `resolve_data` takes) and
    `captions_per_image` of their captions (all of them with captions_per_image=0), as the student's inputs."""
    from mcad.data import spec as data_spec
    from mcad.data.images import load_images, normalize

    spec = resolve_data(data)
    if spec.format == "wds":  # shards are decoded as they are read: draw from the decoded split
        pixels_u8, corpus = data_spec.load_pixels(spec, split, model.image_size)
        drop = _draw(corpus.n_images, n, seed)
        pixels_u8, corpus = pixels_u8[[i for i in range(len(pixels_u8)) if i not in drop]], corpus.drop_images(drop)
    else:
        corpus = data_spec.load_corpus(spec, split)
        corpus = corpus.drop_images(_draw(corpus.n_images, n, seed))
        pixels_u8, corpus = load_images(corpus, model.image_size, progress=progress, view=getattr(model, "view", None))
    pixels = normalize(pixels_u8, model.image_mean, model.image_std).numpy().astype(np.float32)
    caps, c2i = [], []
    for img, cids in enumerate(corpus.image_captions()):
        take = cids if captions_per_image <= 0 else cids[:captions_per_image]
        caps += [corpus.captions[c] for c in take]
        c2i += [img] * len(take)
    ids = tokenizer.encode_batch(caps)
    where = spec.describe() if spec.format != "karpathy" else spec.get("json")
    log.info("%s: %d images, %d captions from split %s of %s", "samples", len(pixels), len(ids), split, where)
    return Samples(pixels, ids, np.asarray(c2i, dtype=np.int64), f"{where}:{split}")
