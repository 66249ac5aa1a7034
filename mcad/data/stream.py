"""Images as every training and evaluation command reads them: decoded on demand, off the training
thread, never a whole split at once.

- `View`: how a model sees an image file (its size and resize rule: mcad's square crop, CLIP's
  shortest-edge resize + centre crop, BLIP's resize to a square without crop). `decode_view` is the
  one decoder; it matches transformers' PIL image processors pixel for pixel (tests).
- `Images`: one split's images at one view, indexed like an array (`images[idx]` -> uint8
  [B, 3, S, S]). `FileImages` decodes image files (or webdataset tar members, read by offset) when
  asked; `ArrayImages` serves an already decoded array (the synthetic set's pixel cache, tests).
- The one loader: `Images.chunks` (in order, for encoding passes) and `StepFeed` (the batches of a
  training run, which are pure functions of the step) put a `torch.utils.data.DataLoader` with
  workers in front of `FileImages`; an `ArrayImages` is indexed directly (at 64 px a batch is a
  memory copy, cheaper than shipping it from a worker).
- `scan`: before any work, every file is read once (sha256) and checked (header size, a decode);
  unreadable ones are reported with their file and dropped with their captions, as a whole-split
  decode did. Results are kept per file under `mcad_cache_dir()/scan`, keyed by path, size and
  mtime, so a second command over the same files does not read them again.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

log = logging.getLogger("mcad.data")

from mcad.data.scan import _map, read_bytes, scan  # noqa: E402,F401  (scan: every file read once)

MODES = ("square", "shortest", "squash")
# images per encoding batch: ~4.2 M pixels, so a float batch stays ~50 MB whatever the size (256 at
# the synthetic set's 64 px, as before; 83 at CLIP's 224 px; 28 at BLIP's 384 px)
PIXELS_PER_BATCH = 256 * 128 * 128


def image_batch(size: int, cap: int = 256) -> int:
    """Images per batch of an encoding pass at `size` px (see PIXELS_PER_BATCH)."""
    return max(8, min(int(cap), PIXELS_PER_BATCH // (int(size) * int(size))))


@dataclass(frozen=True)
class View:
    """How a model sees an image file. `square`: centre crop to a square, bicubic resize to `size`
    (mcad's models, the synthetic set); `shortest`: bicubic resize of the shortest edge to `resize`
    (default `size`), centre crop `size` (CLIPImageProcessor); `squash`: bicubic resize to
    size x size, no crop (BlipImageProcessor)."""
    size: int
    mode: str = "square"
    resize: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"image view mode {self.mode!r}: expected one of {', '.join(MODES)}")

    def describe(self) -> str:
        if self.mode == "shortest":
            return f"shortest edge to {self.resize or self.size} (bicubic), centre crop {self.size}"
        if self.mode == "squash":
            return f"bicubic resize to {self.size} x {self.size}, no crop"
        return f"centre crop to a square, bicubic resize to {self.size}"

    def record(self) -> dict:
        return {"image_size": int(self.size), "resize_mode": self.mode, "resize_to": int(self.resize or self.size)}

    @classmethod
    def from_record(cls, rec: dict) -> "View":
        mode = rec.get("resize_mode", "square")
        size = int(rec["image_size"])
        return cls(size, mode, int(rec.get("resize_to") or size) if mode == "shortest" else None)


def open_image(src, max_pixels: int | None = None):
    """A loaded RGB PIL image of a path or bytes, each PIL mode by its meaning (mcad.data.images.open_rgb);
    over `max_pixels` (header) is ImageTooLarge."""
    from mcad.data.images import open_rgb

    return open_rgb(src, max_pixels)


def apply_view(im, view: View) -> np.ndarray:
    """RGB PIL image -> uint8 [3, S, S] as `view` says."""
    from PIL import Image

    w, h = im.size
    s = view.size
    if view.mode == "square":
        if w != h:
            c = min(w, h)
            left, top = (w - c) // 2, (h - c) // 2
            im = im.crop((left, top, left + c, top + c))
        if im.size != (s, s):
            im = im.resize((s, s), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    if view.mode == "squash":
        if im.size != (s, s):
            im = im.resize((s, s), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    # shortest: as CLIPImageProcessor (resize the shortest edge, long side int(r * long / short), crop)
    short, long = (w, h) if w <= h else (h, w)
    r = max(int(view.resize or s), s)
    new_long = int(r * long / short)
    nw, nh = (r, new_long) if w <= h else (new_long, r)
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BICUBIC)
    top, left = (nh - s) // 2, (nw - s) // 2
    return np.asarray(im, dtype=np.uint8)[top:top + s, left:left + s].transpose(2, 0, 1).copy()


def decode_view(src, view: View, max_pixels: int | None = None) -> np.ndarray:
    """Decode a path or bytes as `view` says; uint8 [3, size, size]."""
    return apply_view(open_image(src, max_pixels), view)


# -- images of one split at one view ---------------------------------------------------------------
class Images:
    """One split's images at one view, indexed like an array: `images[idx]` -> uint8 [B, 3, S, S]."""

    view: View
    workers: int = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return self.take(np.arange(len(self))[idx])
        if np.ndim(idx) == 0:
            return self.take(np.array([int(idx)]))[0]
        return self.take(np.asarray(idx, dtype=np.int64))

    def as_view(self, view: View) -> "Images":
        """The same images as another model sees them."""
        raise NotImplementedError

    def key(self, captions: list[str]) -> str:
        """What a model trained (or a cache computed) on these images and captions depends on."""
        raise NotImplementedError

    def batches(self, index_lists: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The images of each index list in turn, decoded ahead by the DataLoader's workers."""
        lists = list(index_lists)
        return _map(_Batches([self], lists), self.workers)

    def chunks(self, batch_size: int) -> Iterator[np.ndarray]:
        """All images in order, `batch_size` at a time."""
        n = len(self)
        return self.batches(np.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size))


class ArrayImages(Images):
    """An already decoded array (the synthetic set's pixel cache, tests). Another model's view of it
    is made from the array by `mcad.preprocess.model_input` (resize), as before streaming."""

    def __init__(self, array: np.ndarray, view: View | None = None):
        self.array = array
        self.view = view or View(int(array.shape[-1]))
        self.workers = 0

    def __len__(self) -> int:
        return len(self.array)

    @property
    def shape(self):
        return self.array.shape

    def take(self, idx: np.ndarray) -> np.ndarray:
        return self.array[idx]

    def batches(self, index_lists: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        return (self.array[np.asarray(i)] for i in index_lists)

    def as_view(self, view: View) -> "Images":
        return self

    def key(self, captions: list[str]) -> str:
        from mcad.data.images import data_key

        return data_key(self.array, captions)


class FileImages(Images):
    """Image files (or tar members) of a scanned corpus, decoded when asked for."""

    def __init__(self, corpus, view: View, digests: list[str], workers: int = 0):
        self.paths, self.metas = list(corpus.image_paths), list(corpus.meta or [None] * corpus.n_images)
        self.caption_to_image = np.asarray(corpus.caption_to_image)
        self.view, self.digests, self.workers = view, list(digests), int(workers)

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, idx: np.ndarray) -> np.ndarray:
        return take_views([self], idx)[0]

    def as_view(self, view: View) -> "Images":
        if view == self.view:
            return self
        other = object.__new__(FileImages)
        other.__dict__.update(self.__dict__, view=view)
        return other

    def key(self, captions: list[str]) -> str:
        from mcad.data.images import DECODE_VERSION, MAX_PIXELS

        h = hashlib.sha256(f"mcad-files/{DECODE_VERSION}|{self.view.describe()}|{MAX_PIXELS}".encode())
        for p, d in zip(self.paths, self.digests):
            h.update(f"{p}\0{d}\0".encode("utf-8", "surrogateescape"))
        h.update(self.caption_to_image.astype(np.int64).tobytes())
        for c in captions:
            h.update(c.encode("utf-8") + b"\0")
        return h.hexdigest()


def take_views(images: list[Images], idx: np.ndarray) -> list[np.ndarray]:
    """`images[k][idx]` for each k; files shared by several views are read and decoded once."""
    idx = np.asarray(idx, dtype=np.int64)
    files = [im for im in images if isinstance(im, FileImages)]
    if not files:
        return [im.take(idx) for im in images]
    first = files[0]
    decoded = {}
    for i in idx.tolist():
        pil = open_image(read_bytes(first.paths[i], first.metas[i]))
        decoded[i] = [apply_view(pil, im.view) if isinstance(im, FileImages) else None for im in images]
    out = []
    for k, im in enumerate(images):
        if isinstance(im, FileImages):
            s = im.view.size
            out.append(np.stack([decoded[i][k] for i in idx.tolist()]) if len(idx) else
                       np.zeros((0, 3, s, s), dtype=np.uint8))
        else:
            out.append(im.take(idx))
    return out


class _Batches:
    """Dataset: item j = the images of index list j, for each of `images` (runs in workers)."""

    def __init__(self, images: list[Images], lists):
        self.images, self.lists = images, lists

    def __len__(self):
        return len(self.lists)

    def __getitem__(self, j):
        out = take_views(self.images, self.lists[j])
        return out if len(out) > 1 else out[0]


class _StepBatches:
    """Dataset: item j = the images of step start + j's batch (`batch_of` is a pure function of the step)."""

    def __init__(self, images: list[Images], batch_of: Callable[[int], np.ndarray], start: int, stop: int):
        self.images, self.batch_of, self.start, self.stop = images, batch_of, start, stop

    def __len__(self):
        return max(0, self.stop - self.start)

    def __getitem__(self, j):
        return take_views(self.images, self.batch_of(self.start + j))


class StepFeed:
    """The decoded images of each training step's batch, one array per `images` view. Batches are
    pure functions of the step (mcad.distill.sampling), so workers decode the next steps while the model
    trains on this one; a resume (a step other than the next) starts the loader there."""

    def __init__(self, images: list[Images], batch_of: Callable[[int], np.ndarray], steps: int):
        self.images, self.batch_of, self.steps = list(images), batch_of, int(steps)
        self.workers = max((im.workers for im in self.images), default=0)
        self._it, self._next = None, None

    def __call__(self, step: int) -> list[np.ndarray]:
        if self.workers <= 0:
            return take_views(self.images, self.batch_of(step))
        if self._it is None or step != self._next:
            self._it = _map(_StepBatches(self.images, self.batch_of, step, max(step + 1, self.steps)), self.workers)
        self._next = step + 1
        return next(self._it)


def open_images(corpus, view: View, workers: int = 0, progress: bool = True):
    """(FileImages, corpus without its unusable images): every file scanned first (`scan`); each
    problem is reported with its file and counted, and the image is dropped with its captions."""
    digests, bad = scan(corpus, workers, progress)
    for i, problem in sorted(bad.items()):
        corpus.report.add(corpus.image_paths[i], problem)
    keep = [d for i, d in enumerate(digests) if i not in bad]
    corpus = corpus.drop_images(set(bad))
    return FileImages(corpus, view, keep, workers), corpus


def as_images(pixels) -> Images:
    """An Images for what callers pass: Images as they are, a uint8 array wrapped."""
    return pixels if isinstance(pixels, Images) else ArrayImages(np.asarray(pixels))


def default_workers() -> int:
    """DataLoader workers for decoding image files: the CPUs this process may use, at most 8, less one
    for the training thread (0 on one CPU: decode in place)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, n - 1)) if n > 1 else 0
