"""Image decoding and preprocessing with PIL/numpy/torch only (no torchvision).

`to_rgb` turns every PIL mode a data set can hold into 8-bit RGB by its meaning, not by PIL's
clipping: 16-bit and 32-bit integer greys are scaled by their range (PIL's own conversion clips
them, so a 16-bit PNG decodes to white), float greys are read as 0..1, alpha and palette
transparency are composited onto white (as transformers' `convert_to_rgb`), CMYK and YCbCr go
through PIL's colour conversions. A mode with no defined 8-bit meaning is an `UnsupportedImage`
(a ValueError: counted as a bad image by every loader)."""
from __future__ import annotations

import hashlib
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
# Decompression bombs: an image whose header claims more pixels than this is refused before it is
# decoded (PIL only warns between its own limit and twice it: a 219-byte PNG of 12000 x 12000
# decodes to 600 MB). 64 Mpx is above any camera photo a retrieval set holds.
MAX_PIXELS = 64_000_000
# What a decoded pixel array depends on besides the image files; bump when decode_image changes
# so that the caches written by the old code are decoded again.
DECODE_VERSION = 3
# PIL modes read by their meaning (to_rgb); anything else is refused, never guessed
COLOUR_MODES = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
WIDE_GREY = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


class ImageTooLarge(ValueError):
    """The image's header claims more than MAX_PIXELS pixels."""


class UnsupportedImage(ValueError):
    """An image whose pixels have no defined 8-bit RGB meaning (an unknown mode, float or 32-bit
    values outside their range)."""


def to_rgb(im):
    """A loaded PIL image of any supported mode -> an RGB PIL image (see the module docstring)."""
    from PIL import Image

    mode = im.mode
    if mode in WIDE_GREY:
        return _grey_to_rgb(np.asarray(im).astype(np.float64), WIDE_GREY[mode], mode)
    if mode == "F":
        return _grey_to_rgb(np.asarray(im, dtype=np.float64), 1.0, mode)
    if mode not in COLOUR_MODES and mode not in ALPHA_MODES:
        raise UnsupportedImage(f"image mode {mode}: no defined RGB meaning (supported: "
                               f"{', '.join((*COLOUR_MODES, *ALPHA_MODES, *WIDE_GREY, 'F'))})")
    if mode in ALPHA_MODES or im.info.get("transparency") is not None:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if mode == "RGB" else im.convert("RGB")


def _grey_to_rgb(values: np.ndarray, top: float, mode: str):
    """Grey values on 0..top -> an 8-bit RGB image (rounded); values outside the range (a 32-bit
    integer or float image of another scale) have no defined meaning: refused."""
    from PIL import Image

    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > top:
        raise UnsupportedImage(f"image mode {mode}: values {lo:g}..{hi:g} outside 0..{top:g}, no defined 8-bit meaning")
    grey = np.rint(values * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB")


def open_rgb(src, max_pixels: int | None = None):
    """A loaded RGB PIL image of a path or bytes (`to_rgb`); a header over `max_pixels` (default
    MAX_PIXELS) is ImageTooLarge, before any decoding."""
    import io
    import warnings

    from PIL import Image

    f = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
    with warnings.catch_warnings():  # PIL's warning zone lies above our limit: refused below, not warned
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(f)  # reads the header only: the size is known before any decoding
    with im:
        limit = MAX_PIXELS if max_pixels is None else max_pixels
        if im.size[0] * im.size[1] > limit:
            raise ImageTooLarge(f"{im.size[0]} x {im.size[1]} = {im.size[0] * im.size[1]:,} pixels, over the "
                                f"limit of {limit:,} (mcad.data.images.MAX_PIXELS)")
        im.load()
        out = to_rgb(im)
        return out.copy() if out is im else out


def decode_image(src: str | Path | bytes, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Decode, centre-crop to square and resize (bicubic) to `size`; returns uint8 [3, size, size]
    (mcad.data.stream's `square` view, mcad's own models' rule)."""
    from mcad.data.stream import View, apply_view

    return apply_view(open_rgb(src, max_pixels), View(int(size)))


def content_digest(paths: list[str], size: int, view=None) -> str:
    """sha256 over every image file's bytes (with its path, in order), the output size and the
    decoder version: everything a decoded array depends on. A regenerated data set at the same
    paths (`mcad data seed=2 force=true`) gets another digest."""
    h = hashlib.sha256(f"mcad-pixels/{DECODE_VERSION}|{size}|{MAX_PIXELS}".encode())
    if view is not None and view.mode != "square":  # the square rule keeps the digests written before views
        h.update(view.describe().encode())
    for p in paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
        try:
            with open(p, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
        except OSError as e:  # decoding will report it; the digest only has to differ
            h.update(f"unreadable {type(e).__name__}".encode())
    return h.hexdigest()


def data_key(pixels: np.ndarray, captions: list[str]) -> str:
    """sha256 of decoded images and their captions: what a model trained or a cache computed on
    them depends on (same sizes and caption counts are not the same data)."""
    h = hashlib.sha256(f"{pixels.shape}|{pixels.dtype}".encode())
    h.update(np.ascontiguousarray(pixels).data)
    for c in captions:
        h.update(c.encode("utf-8") + b"\0")
    return h.hexdigest()


def _cache_file(cache_dir: str | Path, corpus: Corpus, size: int, view=None) -> Path:
    # named by the image list (one file per split/subset, rewritten when the content changes),
    # keyed by the content digest stored inside it
    key = hashlib.sha256(("\n".join(corpus.image_paths) + f"|{size}").encode()).hexdigest()[:16]
    mode = "" if view is None or view.mode == "square" else f"{view.mode}_"
    return Path(cache_dir) / f"pixels_{corpus.split}_{mode}{size}_{key}.npz"


def _read_cache(cache: Path, digest: str) -> tuple[np.ndarray, list[int]] | None:
    """(pixels, bad indices) of a cache written from these very files, else None."""
    if not cache.exists():
        return None
    try:
        with np.load(cache) as z:
            if "content" not in z.files or str(z["content"]) != digest:
                log.info("%s: images changed since this pixel cache was written; decoding them again", cache)
                return None
            return z["pixels"], z["bad"].tolist()
    except (OSError, ValueError, KeyError, EOFError) as e:  # torn or foreign: decode again, it is only a cache
        log.warning("%s: unreadable pixel cache (%s); decoding the images again", cache, type(e).__name__)
        return None


def _decode_all(corpus: Corpus, size: int, progress: bool, view=None) -> tuple[np.ndarray, set[int]]:
    from mcad.data.stream import View, apply_view

    view = view or View(int(size))
    out = np.zeros((corpus.n_images, 3, size, size), dtype=np.uint8)
    bad: set[int] = set()
    for i, p in enumerate(tqdm(corpus.image_paths, desc=f"decode {corpus.split} images", unit="img",
                               disable=not progress, leave=False)):
        try:
            out[i] = apply_view(open_rgb(p), view)
        except ImageTooLarge as e:
            corpus.report.add(p, f"image too large ({e})")
            bad.add(i)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
            corpus.report.add(p, f"unreadable image ({type(e).__name__}: {e})")
            bad.add(i)
    return out, bad


def load_images(corpus: Corpus, size: int, cache_dir: str | Path | None = None,
                progress: bool = True, view=None) -> tuple[np.ndarray, Corpus]:
    """Decode every image of the corpus. Unreadable images (and images over MAX_PIXELS) are
    reported (file + error) and dropped with their captions; the returned corpus is re-indexed
    to match the array.

    With `cache_dir`, the decoded array is kept as .npz, valid only for the same image bytes
    (`content_digest`): a cache of other images at the same paths is decoded again, never reused."""
    cache = digest = None
    if cache_dir is not None:
        cache, digest = _cache_file(cache_dir, corpus, size, view), content_digest(corpus.image_paths, size, view)
        hit = _read_cache(cache, digest)
        if hit is not None:
            out, bad_list = hit
            for i in bad_list:
                corpus.report.add(corpus.image_paths[i], "unreadable image (cached finding)")
            bad = set(bad_list)
            # the cache holds every row (bad ones as zeros): drop them as a fresh decode does
            return (out[[i for i in range(len(out)) if i not in bad]] if bad else out), corpus.drop_images(bad)
    out, bad = _decode_all(corpus, size, progress, view)
    if cache is not None:
        from mcad.io import atomic_path

        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, pixels=out, bad=np.array(sorted(bad), dtype=np.int64), content=np.array(digest))
    keep = [i for i in range(corpus.n_images) if i not in bad]
    return out[keep], corpus.drop_images(bad)


def normalize(pixels_uint8, mean=DEFAULT_MEAN, std=DEFAULT_STD):
    """uint8 [B,3,H,W] (numpy or torch) -> float32 torch tensor, standardised per channel."""
    import torch

    x = torch.as_tensor(pixels_uint8).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
