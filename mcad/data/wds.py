"""webdataset tar shards (`<key>.jpg|.png` + `<key>.txt` per sample), the format of img2dataset and
open_clip's `--dataset-type webdataset`, streamed with the `webdataset` package.

`iter_wds` streams decoded samples (for data too big to hold); `load_wds` materialises a small set
as (pixels, Corpus) with the sample key as the image "path". Every skipped sample (corrupt image,
missing or empty caption, missing image) and every unreadable shard is reported in the
`LoadReport` with shard and key, and counted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from mcad.data.corpus import Corpus, DataError, LoadReport, clean_caption
from mcad.data.images import decode_image

log = logging.getLogger("mcad.data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt",)
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass
class WdsSample:
    shard: str
    key: str
    image: np.ndarray  # uint8 [3, S, S]
    caption: str


def shard_list(shards: str | Path | Iterable[str | Path]) -> list[str]:
    """A brace pattern (`data/shard-{000..009}.tar`), one path, or a list of them -> shard paths."""
    from braceexpand import braceexpand  # a webdataset dependency

    items = [shards] if isinstance(shards, (str, Path)) else list(shards)
    out: list[str] = []
    for s in items:
        out.extend(braceexpand(str(s)))
    if not out:
        raise DataError("webdataset: no shards given")
    return out


def _describe(shards: list[str]) -> str:
    return shards[0] if len(shards) == 1 else f"{shards[0]} (+{len(shards) - 1} shards)"


def _exception_handler(report: LoadReport, urls: list[str]):
    """webdataset handler: report a broken shard (truncated tar, bad member...) and go on."""
    known = set(urls)

    def handle(exn: Exception) -> bool:
        args = exn.args or ("",)
        shard = next((a for a in reversed(args[1:]) if isinstance(a, str) and a in known), None)
        if shard is None:  # errors inside a shard carry it only in the stream's repr
            shard = next((u for u in urls if f"name='{u}'" in str(args[0])), None)
        where = shard or _describe(urls)
        msg = str(args[0]).split(" @ <", 1)[0]  # webdataset appends the stream's repr
        problem = f"unreadable shard ({type(exn).__name__}: {msg})"
        # A truncated tar fails once in the member loop and again in the shard loop: report it once.
        if not report.problems or report.problems[-1] != (where, problem):
            report.add(where, problem)
        return True

    return handle


def sample_caption(raw, where: str, report: LoadReport) -> str | None:
    """A sample's caption (bytes or text) cleaned, or None with the problem reported."""
    if raw is None:
        report.add(where, "no caption in sample (expected .txt)")
        return None
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError:
        report.add(where, "caption is not UTF-8")
        return None
    return clean_caption(text, where, report)


def iter_wds_samples(shards: str | Path | Iterable[str | Path], size: int,
                     report: LoadReport | None = None) -> Iterator[WdsSample]:
    """Stream decoded samples in shard order. Bad samples are reported and skipped."""
    import webdataset as wds

    urls = shard_list(shards)
    if report is None:
        report = LoadReport(_describe(urls))
    for u in urls:
        if "://" not in u and not u.startswith("pipe:") and not Path(u).is_file():
            report.add(u, "missing shard")
    urls = [u for u in urls if "://" in u or u.startswith("pipe:") or Path(u).is_file()]
    if not urls:
        return
    ds = wds.WebDataset(urls, shardshuffle=False, handler=_exception_handler(report, urls),
                        empty_check=False, nodesplitter=None)
    for sample in ds:
        key = sample.get("__key__", "?")
        shard = sample.get("__url__", "?")
        where = f"{shard} [{key}]"
        img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
        cap_ext = next((e for e in CAPTION_EXTS if e in sample), None)
        if img_ext is None:
            report.add(where, "no image in sample (expected ." + "/.".join(IMAGE_EXTS) + ")")
            continue
        cap = sample_caption(sample.get(cap_ext) if cap_ext else None, where, report)
        if cap is None:
            continue
        try:
            img = decode_image(bytes(sample[img_ext]), size)
        except _DECODE_ERRORS as e:
            report.add(where, f"unreadable image ({type(e).__name__}: {e})")
            continue
        yield WdsSample(shard, key, img, cap)


def iter_wds(shards: str | Path | Iterable[str | Path], size: int,
             report: LoadReport | None = None) -> Iterator[tuple[np.ndarray, str]]:
    """Stream (uint8 [3, size, size] image, caption) pairs; bad samples go to `report`."""
    for s in iter_wds_samples(shards, size, report):
        yield s.image, s.caption


def load_wds(shards: str | Path | Iterable[str | Path], size: int, split: str = "train",
             max_samples: int | None = None, name: str | None = None) -> tuple[np.ndarray, Corpus]:
    """Materialise the shards: (pixels uint8 [N, 3, size, size], Corpus with keys as image paths).

    One sample is one image with one caption; a key seen again (in another shard) is kept as a
    separate image. Raises `DataError` naming the shards when nothing is usable."""
    urls = shard_list(shards)
    report = LoadReport(_describe(urls))
    pixels, keys, captions = [], [], []
    for s in iter_wds_samples(urls, size, report):
        pixels.append(s.image)
        keys.append(s.key)
        captions.append(s.caption)
        if max_samples is not None and len(keys) >= max_samples:
            break
    report.log_summary()
    corpus = Corpus(name or Path(urls[0]).stem, split, keys, captions, np.arange(len(keys)), report)
    arr = np.stack(pixels) if pixels else np.zeros((0, 3, size, size), dtype=np.uint8)
    log.info("%s: %d samples loaded, %d skipped", report.source, len(keys), len(report.problems))
    return arr, corpus


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's (key, extension) of a member name: `dir/key.ext.more` -> (`dir/key`, `ext.more`)."""
    import re

    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else None


def _tar_samples(url: str, report: LoadReport) -> Iterator[tuple[str, dict]]:
    """(key, {ext: TarInfo, "txt": bytes}) per sample of one shard, in member order, reading only the
    captions; a shard that ends early (truncated) is reported and yields what came before."""
    import tarfile

    key, sample = None, {}
    try:
        with tarfile.open(url, "r:") as tar:
            for m in tar:
                parts = _split_name(m.name) if m.isfile() else None
                if parts is None:
                    continue
                if parts[0] != key and key is not None:
                    yield key, sample
                    sample = {}
                key = parts[0]
                ext = parts[1]
                sample[ext] = tar.extractfile(m).read() if ext in CAPTION_EXTS else m
    except (tarfile.TarError, OSError, EOFError) as e:
        report.add(url, f"unreadable shard ({type(e).__name__}: {e})")
    if key is not None:
        yield key, sample


def index_wds(shards: str | Path | Iterable[str | Path], split: str = "train", max_samples: int | None = None,
              name: str | None = None) -> Corpus:
    """The shards as a Corpus without decoding any image: each image is a tar member read later by
    offset (`meta`: tar, offset, size; mcad.data.stream.read_bytes), so images are decoded when a
    command asks for them, in DataLoader workers. Caption problems are reported here with shard and
    key, as `iter_wds_samples` reports them; unreadable images are found by the scan of
    `mcad.data.stream.open_images`."""
    urls = shard_list(shards)
    report = LoadReport(_describe(urls))
    keys, captions, meta = [], [], []
    for u in urls:
        if not Path(u).is_file():
            report.add(u, "missing shard")
            continue
        for key, sample in _tar_samples(u, report):
            where = f"{u} [{key}]"
            img_ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if img_ext is None:
                report.add(where, "no image in sample (expected ." + "/.".join(IMAGE_EXTS) + ")")
                continue
            cap = sample_caption(next((sample[e] for e in CAPTION_EXTS if e in sample), None), where, report)
            if cap is None:
                continue
            info = sample[img_ext]
            keys.append(key)
            captions.append(cap)
            meta.append({"tar": u, "offset": int(info.offset_data), "size": int(info.size), "key": key})
            if max_samples is not None and len(keys) >= max_samples:
                break
        if max_samples is not None and len(keys) >= max_samples:
            break
    report.log_summary()
    return Corpus(name or Path(urls[0]).stem, split, keys, captions, np.arange(len(keys)), report, meta)
