"""Unpaired data: images without captions and texts without images (the recipe's `unpaired:` keys,
declared in mcad/configs/student.yaml and checked here).

  unpaired.images=DIR          every image file under DIR (recursive, sorted by path)
  unpaired.images=SPEC         the images of a data spec's split: a path `data=` takes (a Karpathy
                               *.json, a *.csv/*.tsv, *.tar shards, a synthetic root: a folder holding
                               dataset_synth.json), or a mapping of data.* keys with `split` (default train)
  unpaired.texts=FILE.txt      a UTF-8 text file, one query or caption a line (blank lines skipped)
  unpaired.texts=SPEC          the captions of a data spec's split, as for images
  unpaired.paired=false        distill on the unpaired data alone (the data spec's eval split still evaluates)
  unpaired.weight, unpaired.k  the unpaired loss's weight; candidates per image and per text

Images are streamed as the paired data's are (mcad.data.stream: scanned once, unreadable files
reported and dropped, decoded in DataLoader workers); a spec's images come through `open_split`.
Bad input is one line naming the key and the file: a source with no image or no text, a text file
that is not UTF-8 (its line number).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from mcad.data import spec as data_spec
from mcad.data.corpus import DataError, LoadReport

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SPEC_SUFFIXES = (".json", ".csv", ".tsv", ".tab", ".tar")
UNPAIRED_DEFAULTS: dict[str, Any] = {"images": None, "texts": None, "paired": True, "weight": 1.0, "k": 4}


@dataclass(frozen=True)
class Source:
    """Where unpaired images or texts come from: a folder of images, a text file, or a data spec's split."""
    kind: str                        # images | texts
    form: str                        # folder | text file | spec
    path: str | None = None          # folder / text file
    spec: data_spec.DataSpec | None = None
    split: str = "train"

    def describe(self) -> str:
        if self.form == "spec":
            d = self.spec.describe()
            return f"{d if '=' in str(d) else 'data.root=' + str(d)} split={self.split} ({self.kind})"
        return f"{self.form} {self.path}"


@dataclass(frozen=True)
class Unpaired:
    """The checked `unpaired:` mapping."""
    images: Source | None
    texts: Source | None
    paired: bool
    weight: float
    k: int

    @property
    def on(self) -> bool:
        return self.images is not None or self.texts is not None


def parse_unpaired(value: Mapping | None, where: str = "unpaired") -> Unpaired:
    """A recipe's `unpaired:` mapping -> Unpaired; a bad value is one line naming its key."""
    cfg = {**UNPAIRED_DEFAULTS, **(value or {})}
    unknown = sorted(set(cfg) - set(UNPAIRED_DEFAULTS))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (valid: {', '.join(UNPAIRED_DEFAULTS)})")
    if not isinstance(cfg["paired"], bool):
        raise ValueError(f"{where}.paired={cfg['paired']!r}: must be true or false")
    weight = cfg["weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise ValueError(f"{where}.weight={weight!r}: must be a number >= 0")
    from mcad.checks import integer

    k = integer(cfg["k"], f"{where}.k", 1)
    out = Unpaired(parse_source("images", cfg["images"], f"{where}.images"),
                   parse_source("texts", cfg["texts"], f"{where}.texts"), cfg["paired"], float(weight), k)
    if not out.paired and (out.images is None or out.texts is None):
        missing = "images" if out.images is None else "texts"
        raise ValueError(f"{where}.paired=false needs both {where}.images and {where}.texts ({where}.{missing} is "
                         f"not given; a data spec's {missing} serve too, e.g. {where}.{missing}=<data path>)")
    return out


def parse_source(kind: str, value: Any, where: str) -> Source | None:
    """One `unpaired.images` / `unpaired.texts` value (see the module doc) -> Source (None: not given)."""
    if value is None or value == "":
        return None
    if isinstance(value, Mapping):
        args = dict(value)
        split = str(args.pop("split", None) or "train")
        return Source(kind, "spec", spec=data_spec.parse(args, where=where), split=split)
    if not isinstance(value, (str, Path)):
        raise ValueError(f"{where}: expected a path or a data spec mapping, got {type(value).__name__}")
    p = Path(str(value))
    low = p.name.lower()
    if low.endswith(SPEC_SUFFIXES) or "{" in str(value) or (p.is_dir() and data_spec.synth_json(p).exists()):
        return Source(kind, "spec", spec=data_spec.parse(str(value), where=where))
    if kind == "images":
        if not p.is_dir():
            raise ValueError(f"{where}={value}: no such folder (give a folder of images, or a data spec's path)")
        return Source(kind, "folder", path=str(p))
    if p.is_dir():
        raise ValueError(f"{where}={value}: a folder, not a text file (give a UTF-8 file, one text a line, or a data "
                         f"spec's path)")
    if not p.is_file():
        raise ValueError(f"{where}={value}: no such text file (give a UTF-8 file, one text a line, or a data "
                         f"spec's path)")
    return Source(kind, "text file", path=str(p))


# -- images ----------------------------------------------------------------------------------------
class ImageFolder:
    """The image files of a folder, in the shape mcad.data.stream reads (a corpus without captions)."""

    def __init__(self, root: str, paths: list[str], report: LoadReport | None = None):
        self.name, self.split, self.root = Path(root).name, "unpaired", root
        self.image_paths, self.meta = list(paths), None
        self.captions: list[str] = []
        self.caption_to_image = np.zeros(0, dtype=np.int64)
        self.report = report or LoadReport(str(root))

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    def drop_images(self, bad: set[int]) -> "ImageFolder":
        return ImageFolder(self.root, [p for i, p in enumerate(self.image_paths) if i not in bad], self.report)


def image_files(folder: str, where: str) -> list[str]:
    """Every image file under `folder` (by suffix, recursive, sorted); none is one line."""
    root = Path(folder)
    files = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"{where}={folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}: give a "
                        f"folder holding images")
    return files


def open_unpaired_images(source: Source, view, workers: int | None = None, progress: bool = True, where: str = ""):
    """mcad.data.stream.Images of the source's images at `view` (streamed; unreadable files reported and
    dropped); a source with no usable image is one line."""
    where = where or "unpaired.images"
    if source.form == "spec":
        images, _ = data_spec.open_split(source.spec, source.split, view, workers, progress)
        return images
    from mcad.data.stream import default_workers, open_images

    folder = ImageFolder(source.path, image_files(source.path, where))
    images, kept = open_images(folder, view, default_workers() if workers is None else int(workers), progress)
    kept.report.log_summary()
    if not len(images):
        raise DataError(f"{where}={source.path}: no readable image ({len(kept.report.problems)} files skipped, the "
                        f"first: {kept.report.problems[0][0]}: {kept.report.problems[0][1]})")
    return images


# -- texts -------------------------------------------------------------------------------------------
def read_text_lines(path: str | Path, where: str = "unpaired.texts") -> list[str]:
    """The non-blank lines of a UTF-8 text file, whitespace folded; a line that is not UTF-8 is one
    error naming the file and the line."""
    raw = Path(path).read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    out = []
    for n, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}={path}: line {n} is not UTF-8 ({e.reason} at byte {e.start + 1} of the line, "
                            f"0x{line[e.start]:02x}): save the file as UTF-8") from None
        text = " ".join(text.split())
        if text:
            out.append(text)
    if not out:
        raise DataError(f"{where}={path}: no text in the file (one query or caption a line)")
    return out


def load_unpaired_texts(source: Source, where: str = "unpaired.texts") -> list[str]:
    """The source's texts: a text file's lines, or a data spec split's captions."""
    if source.form == "spec":
        return list(data_spec.load_corpus(source.spec, source.split).captions)
    return read_text_lines(source.path, where)


def texts_key(texts: list[str]) -> str:
    """What a cache of these texts depends on: the texts, in order."""
    h = hashlib.sha256(b"mcad-texts/1")
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    return h.hexdigest()
