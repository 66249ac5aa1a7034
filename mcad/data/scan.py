"""Where an image's bytes are, and the scan that reads every file of a split once: hashed and checked
(decodable, not over the pixel limit), the result kept per file under MCAD_CACHE_DIR so a file is
read again only when it changes. mcad.data.stream serves the images the scan let through."""
from __future__ import annotations

import ctypes
import hashlib
import io
import json
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Iterator

log = logging.getLogger("mcad.data")

SCAN_VERSION = 2  # 2: images decoded by their mode's meaning (16-bit greys, alpha)


# -- where an image's bytes are ----------------------------------------------------------------------
def read_bytes(path: str, meta: dict | None) -> bytes:
    """An image file's bytes, or a tar member's (`meta` with tar/offset/size, mcad.data.wds)."""
    if meta and "tar" in meta:
        with open(meta["tar"], "rb") as f:
            f.seek(int(meta["offset"]))
            return f.read(int(meta["size"]))
    with open(path, "rb") as f:
        return f.read()


def _stat_key(path: str, meta: dict | None) -> list:
    if meta and "tar" in meta:
        st = os.stat(meta["tar"])
        return [os.path.abspath(meta["tar"]), st.st_size, st.st_mtime_ns, int(meta["offset"]), int(meta["size"])]
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, st.st_mtime_ns]


def mcad_cache_dir() -> Path:
    """Per-user cache of derived facts about input files: $MCAD_CACHE_DIR, else $XDG_CACHE_HOME/mcad,
    else ~/.cache/mcad."""
    if os.environ.get("MCAD_CACHE_DIR"):
        return Path(os.environ["MCAD_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mcad"


# -- scan: every file read once, hashed and checked ----------------------------------------------------
def check_one(path: str, meta: dict | None) -> tuple[str, str | None]:
    """(sha256 of the file's bytes, the problem that makes it unusable or None)."""
    from PIL import Image, UnidentifiedImageError

    from mcad.data.images import MAX_PIXELS, ImageTooLarge

    try:
        data = read_bytes(path, meta)
    except OSError as e:
        return "", f"unreadable image ({type(e).__name__}: {e})"
    digest = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
        with im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise ImageTooLarge(f"{im.size[0]} x {im.size[1]} = {im.size[0] * im.size[1]:,} pixels, over the "
                                    f"limit of {MAX_PIXELS:,} (mcad.data.images.MAX_PIXELS)")
            im.draft("RGB", (64, 64))  # JPEG: decode at 1/8 scale; every byte is still read and checked
            im.load()
    except ImageTooLarge as e:
        return digest, f"image too large ({e})"
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        return digest, f"unreadable image ({type(e).__name__}: {e})"
    return digest, None


class _CheckFiles:
    """Dataset of the files still to check (runs in DataLoader workers)."""

    def __init__(self, paths: list[str], metas: list[dict | None]):
        self.paths, self.metas = paths, metas

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return check_one(self.paths[i], self.metas[i])


def _scan_file(corpus) -> Path:
    what = f"{SCAN_VERSION}|{corpus.report.source}|{corpus.split}|{len(corpus.image_paths)}|{corpus.image_paths[0]}"
    return mcad_cache_dir() / "scan" / f"{hashlib.sha256(what.encode()).hexdigest()[:20]}.json"


def scan(corpus, workers: int = 0, progress: bool = True) -> tuple[list[str], dict[int, str]]:
    """(sha256 per image, {index: problem} of the unusable ones) of a corpus' images. Files whose
    path, size and mtime are those of the last scan are not read again."""
    from tqdm import tqdm

    metas = corpus.meta or [None] * corpus.n_images
    keys = [_stat_key(p, m) if _exists(p, m) else None for p, m in zip(corpus.image_paths, metas)]
    cache_file = _scan_file(corpus)
    known = _read_scan(cache_file)
    out: list[tuple[str, str | None] | None] = [None] * corpus.n_images
    todo = []
    for i, k in enumerate(keys):
        if k is None:
            out[i] = ("", f"missing image: {corpus.image_paths[i]}")
        elif json.dumps(k) in known:
            out[i] = tuple(known[json.dumps(k)])
        else:
            todo.append(i)
    if todo:
        ds = _CheckFiles([corpus.image_paths[i] for i in todo], [metas[i] for i in todo])
        results = _map(ds, workers)
        for i, r in zip(todo, tqdm(results, total=len(todo), desc=f"check {corpus.split} images", unit="img",
                                   disable=not progress, leave=False)):
            out[i] = r
        known.update({json.dumps(keys[i]): list(out[i]) for i in range(corpus.n_images) if keys[i] is not None})
        _write_scan(cache_file, known)
    digests = [d for d, _ in out]
    return digests, {i: p for i, (_, p) in enumerate(out) if p}


def _exists(path: str, meta: dict | None) -> bool:
    return os.path.isfile(meta["tar"] if meta and "tar" in meta else path)


def _read_scan(f: Path) -> dict:
    try:
        d = json.loads(f.read_text())
        return d["files"] if d.get("version") == SCAN_VERSION else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no scan yet, or a torn one: the files are read again


def _write_scan(f: Path, files: dict) -> None:
    from mcad.io import write_json

    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        write_json(f, {"version": SCAN_VERSION, "files": files})
    except OSError as e:  # a read-only home: the scan is redone next time, nothing else changes
        log.info("could not keep the image scan at %s (%s)", f, e)


def _map(ds, workers: int) -> Iterator:
    """ds[0], ds[1], ... in order, computed by `workers` DataLoader processes (0: here)."""
    if workers <= 0 or len(ds) < 2:
        return (ds[i] for i in range(len(ds)))
    from functools import partial

    from torch.utils.data import DataLoader

    return iter(DataLoader(ds, batch_size=None, shuffle=False, num_workers=int(workers),
                           collate_fn=_as_is, prefetch_factor=2, persistent_workers=False,
                           worker_init_fn=partial(_end_with_parent, os.getpid(),
                                                  threading.current_thread() is threading.main_thread())))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _end_with_parent(parent: int, main_thread: bool, worker_id: int) -> None:
    """DataLoader worker start: the worker ends when the process that made it does, even one killed
    mid-batch (SIGKILL, OOM), instead of decoding on as an orphan holding its memory. Linux:
    prctl(PR_SET_PDEATHSIG, SIGTERM), which fires when the forking *thread* ends, so only for loaders
    made by the main thread; elsewhere torch's own check of the parent (between batches)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the command's handler, inherited through fork
    if not (sys.platform.startswith("linux") and main_thread) or os.getppid() != parent:  # spawn, forkserver
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before the line above took effect
        os._exit(1)


def _as_is(x):  # items cross from the workers as they are (numpy arrays stay numpy)
    return x
