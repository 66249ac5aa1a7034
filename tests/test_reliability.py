"""Issue 13, "nothing stale, nothing silent, nothing of the user's lost": one test per class of
fault. Each failed on the code before the fix (stale caches reused, corrupt files accepted,
mismatches and bad numbers taken, inputs misread without a count, 0600 files, temp files left)."""
from __future__ import annotations

import json
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mcad.data.corpus import DataError


def tiny_synth(root: Path, seed: int) -> Path:
    """A few-image synthetic set written through the CLI path (`mcad data ... force=true`)."""
    from mcad.data.cli import make_synthetic

    make_synthetic({"out": str(root), "seed": seed, "n_train": 8, "n_val": 4, "n_test": 8,
                    "force": True, "progress": False})
    return root


# -- 1. stale caches ----------------------------------------------------------------------------
def test_pixel_cache_is_keyed_by_image_content(tmp_path):
    """`mcad data seed=2 force=true` over an existing set writes new images at the same paths:
    the pixel cache beside the data must not hand back the old ones."""
    from mcad.data.images import load_images
    from mcad.data.karpathy import load_karpathy
    from mcad.teachers import load_split

    root = tiny_synth(tmp_path / "d", seed=0)
    old, _ = load_split(root, "train", 64)                 # writes pixels_train_64_*.npz
    assert len(list(root.glob("pixels_train_64_*.npz"))) == 1
    tiny_synth(root, seed=2)
    new, corpus = load_split(root, "train", 64)
    fresh, _ = load_images(load_karpathy(root / "dataset_synth.json", split="train"), 64, progress=False)
    assert not np.array_equal(old, fresh)
    np.testing.assert_array_equal(new, fresh)
    assert len(list(root.glob("pixels_train_64_*.npz"))) == 1  # rewritten in place, not piled up
    again, _ = load_split(root, "train", 64)               # and a valid cache is still used
    np.testing.assert_array_equal(again, fresh)


def test_pixel_cache_hit_drops_unreadable_rows_like_a_fresh_decode(tmp_path):
    from mcad.data.images import load_images
    from mcad.data.karpathy import load_karpathy

    root = tiny_synth(tmp_path / "d", seed=0)
    corpus = load_karpathy(root / "dataset_synth.json", split="test")
    Path(corpus.image_paths[1]).write_bytes(b"not a png")
    first, c1 = load_images(corpus, 64, cache_dir=root, progress=False)
    second, c2 = load_images(load_karpathy(root / "dataset_synth.json", split="test"), 64, cache_dir=root,
                             progress=False)
    assert first.shape == second.shape == (7, 3, 64, 64)
    np.testing.assert_array_equal(first, second)
    assert c1.image_paths == c2.image_paths
