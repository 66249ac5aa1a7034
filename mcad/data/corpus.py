"""The one in-memory shape every loader produces: images, captions, and which image each caption is of.

Bad rows are never dropped silently: every loader records each problem (file + what is wrong) in a
`LoadReport`, logs the counts, and a corpus with nothing usable is an error, not an empty run.

Image paths stay inside their image root: a path (relative, or absolute) that lies outside it once
`..` are resolved is a bad row ("path leaves the image root"), reported and counted, never read.
The check is on the path as written: symlinks under the root are the data set's own layout and are
followed. For images elsewhere, set `image_root` to a folder that holds them.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("mcad.data")


class DataError(ValueError):
    """Bad input data; the message names the file and the problem on one line."""


class EmptySplit(DataError):
    """A split with no usable image-caption pair (mcad.data.spec adds the fix to the message)."""


@dataclass
class LoadReport:
    source: str
    problems: list[tuple[str, str]] = field(default_factory=list)  # (file or row, problem)

    def add(self, where: str, problem: str) -> None:
        self.problems.append((where, problem))
        if len(self.problems) <= 20:
            log.warning("%s: %s (skipped)", where, problem)
        elif len(self.problems) == 21:
            log.warning("%s: more problems; counts follow at the end", self.source)

    def counts(self) -> dict[str, int]:
        return dict(Counter(p.split(":")[0].split(" (")[0] for _, p in self.problems))

    def summary(self) -> dict:
        return {"source": self.source, "skipped": len(self.problems), "by_problem": self.counts(),
                "first": [f"{w}: {p}" for w, p in self.problems[:10]]}

    def log_summary(self) -> None:
        if self.problems:
            log.warning("%s: skipped %d bad rows/images: %s", self.source, len(self.problems), self.counts())


@dataclass
class Corpus:
    name: str
    split: str
    image_paths: list[str]
    captions: list[str]
    caption_to_image: np.ndarray  # int64 [n_captions], index into image_paths
    report: LoadReport
    meta: list[dict] | None = None  # per-image extra fields (the synthetic scene, say)

    def __post_init__(self) -> None:
        self.caption_to_image = np.asarray(self.caption_to_image, dtype=np.int64)
        if len(self.image_paths) == 0 or len(self.captions) == 0:
            raise EmptySplit(f"{self.report.source}: no usable image-caption pairs in split "
                            f"'{self.split}' ({len(self.report.problems)} rows skipped)")

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def image_captions(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(self.n_images)]
        for c, i in enumerate(self.caption_to_image.tolist()):
            out[i].append(c)
        return out

    def drop_images(self, bad: set[int]) -> "Corpus":
        """Remove images (found unreadable later) and their captions, re-indexing the rest."""
        if not bad:
            return self
        keep = [i for i in range(self.n_images) if i not in bad]
        remap = {old: new for new, old in enumerate(keep)}
        caps, c2i = [], []
        for c, i in zip(self.captions, self.caption_to_image.tolist()):
            if i in remap:
                caps.append(c)
                c2i.append(remap[i])
        meta = [self.meta[i] for i in keep] if self.meta is not None else None
        return Corpus(self.name, self.split, [self.image_paths[i] for i in keep], caps,
                      np.array(c2i, dtype=np.int64), self.report, meta)

    def subset(self, n_images: int) -> "Corpus":
        """The first n images and their captions (tests and quick runs)."""
        return self.drop_images(set(range(n_images, self.n_images)))


def clean_caption(raw: object, where: str, report: LoadReport) -> str | None:
    if not isinstance(raw, str):
        report.add(where, f"caption is not text ({type(raw).__name__})")
        return None
    text = " ".join(raw.split())
    if not text:
        report.add(where, "empty caption")
        return None
    return text


def under_root(root: Path, rel: str) -> tuple[Path, bool]:
    """(the image path, whether it stays inside `root`) for a path as a data file writes it."""
    p = Path(rel) if Path(rel).is_absolute() else root / rel
    base, full = os.path.abspath(root), os.path.abspath(p)  # abspath also folds `..`
    return p, full == base or full.startswith(base.rstrip(os.sep) + os.sep)


def resolve_image(root: Path, rel: str, where: str, report: LoadReport) -> str | None:
    p, inside = under_root(root, rel)
    if not inside:
        report.add(where, f"path leaves the image root ({root}): {rel}")
        return None
    if not p.is_file():
        report.add(where, f"missing image: {p}")
        return None
    return str(p)
