"""An index folder: the faiss index, the image paths (row i of the index is paths[i]), the
embeddings (for `mode=add`/`mode=rebuild` without re-encoding) and manifest.json.

Atomic as a whole: each save writes new files under a fresh generation name (each through
`mcad.io.atomic_path`), then replaces manifest.json (the commit point: it names the files of the
current generation with their sha256), then deletes the files of older generations. A crash leaves
the previous manifest and its files intact; readers only open what the manifest names. Writers take
an flock on `.lock` so two `mcad index mode=add` runs cannot interleave.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mcad.io import atomic_path, file_entry, machine, now_iso, read_json, sha256_file, versions, write_json
from mcad.search.common import SearchError

MANIFEST = "manifest.json"
FORMAT = "mcad-search-index-v1"
GENERATION_FILE = re.compile(r"^(index|paths|embeddings)\.\d{4,}-[0-9a-f]{6}\.(faiss|json|npy)$")


@dataclass
class IndexFolder:
    root: Path
    manifest: dict[str, Any]
    index: Any = None                      # faiss index
    paths: list[str] = field(default_factory=list)
    embeddings: np.ndarray | None = None   # float32 [n, d] or None (keep_embeddings=false)

    @property
    def kind(self) -> str:
        return self.manifest["index"]["type"]

    @property
    def params(self) -> dict:
        return self.manifest["index"].get("params", {})

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])


class VectorFile:
    """Rows of a float32 [n, d] .npy file read with pread: nothing is mapped or loaded, so the
    process's resident memory stays the index's. Used to re-rank a compressed index's shortlist
    with exact scores (the OS page cache may keep hot rows; it is not the process's memory)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran or len(shape) != 2 or dtype != np.float32:
            raise SearchError(f"{self.path}: expected a C-order float32 [n, d] array, got {dtype} {shape}")
        self.n, self.d = int(shape[0]), int(shape[1])
        self.row_bytes = 4 * self.d
        self.fd = os.open(self.path, os.O_RDONLY)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.d), np.float32)
        for j, i in enumerate(ids.tolist()):
            if not 0 <= i < self.n:
                raise SearchError(f"{self.path}: row {i} out of range (n = {self.n})")
            out[j] = np.frombuffer(os.pread(self.fd, self.row_bytes, self.offset + i * self.row_bytes), np.float32)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def vectors(folder: "IndexFolder") -> VectorFile | None:
    """The exact embeddings of an index folder for re-ranking, or None when it keeps none."""
    f = folder.manifest["files"].get("embeddings")
    return VectorFile(folder.root / f["path"]) if f else None


def exists(root: str | Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


@contextlib.contextmanager
def locked(root: str | Path) -> Iterator[None]:
    from mcad.io import FolderBusy, folder_lock

    try:
        with folder_lock(root, "index"):
            yield
    except FolderBusy as e:
        raise SearchError(str(e)) from None


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such index folder (build one with `mcad index`)")
    if not (root / MANIFEST).exists():
        raise SearchError(f"{root}: not an index folder (no {MANIFEST}; build one with `mcad index`)")
    m = read_json(root / MANIFEST)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SearchError(f"{root / MANIFEST}: not an mcad search index manifest (format {m.get('format')!r})")
    return m


def verify_file(root: Path, entry: dict) -> None:
    """Size, then the sha256 the manifest recorded (same-size damage passes a size check, and a
    damaged faiss file can load and silently drop results)."""
    f = root / entry["path"]
    if not f.exists():
        raise SearchError(f"{f}: missing (named by {root / MANIFEST}; the index folder is damaged)")
    if f.stat().st_size != entry["bytes"]:
        raise SearchError(f"{f}: size differs from {root / MANIFEST} (the index folder is damaged)")
    if entry.get("sha256") and sha256_file(f) != entry["sha256"]:
        raise SearchError(f"{f}: content differs from the sha256 in {root / MANIFEST} (the index folder is "
                          "damaged; rebuild it with `mcad index ... overwrite=true`)")


def load(root: str | Path, with_embeddings: bool = False) -> IndexFolder:
    import faiss

    root = Path(root)
    m = read_manifest(root)
    files = m["files"]
    for key in ("index", "paths") + (("embeddings",) if with_embeddings and files.get("embeddings") else ()):
        verify_file(root, files[key])
    try:
        index = faiss.read_index(str(root / files["index"]["path"]))
    except RuntimeError as e:
        raise SearchError(f"{root / files['index']['path']}: not a readable faiss index ({str(e).splitlines()[0]})") from None
    paths = json.loads((root / files["paths"]["path"]).read_text())
    if index.ntotal != len(paths) or index.ntotal != m["count"] or index.d != m["dim"]:
        raise SearchError(f"{root}: index holds {index.ntotal} x {index.d}, paths {len(paths)}, manifest "
                          f"{m['count']} x {m['dim']} (the index folder is damaged; rebuild it)")
    emb = None
    if with_embeddings and files.get("embeddings"):
        emb = np.load(root / files["embeddings"]["path"])
    return IndexFolder(root, m, index, paths, emb)


def save(folder: IndexFolder) -> Path:
    """Write folder.index/paths/embeddings + manifest as a new generation (see module doc)."""
    import faiss

    root = folder.root
    root.mkdir(parents=True, exist_ok=True)
    gen = int(folder.manifest.get("generation", 0)) + 1
    tag = f"{gen:04d}-{secrets.token_hex(3)}"
    names = {"index": f"index.{tag}.faiss", "paths": f"paths.{tag}.json"}
    with atomic_path(root / names["index"]) as tmp:
        faiss.write_index(folder.index, str(tmp))
    with atomic_path(root / names["paths"]) as tmp:
        tmp.write_text(json.dumps(folder.paths))
    if folder.embeddings is not None:
        names["embeddings"] = f"embeddings.{tag}.npy"
        with atomic_path(root / names["embeddings"]) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(folder.embeddings, dtype=np.float32))
    m = dict(folder.manifest)
    m.update(format=FORMAT, generation=gen, updated=now_iso(), machine=machine(), versions=versions(),
             count=int(folder.index.ntotal), dim=int(folder.index.d),
             files={k: file_entry(root / v, root) for k, v in names.items()})
    m.setdefault("created", m["updated"])
    write_json(root / MANIFEST, m)  # the commit point
    folder.manifest = m
    keep = set(names.values())
    for p in root.iterdir():  # older generations only: never a file this module did not name
        if p.is_file() and p.name not in keep and GENERATION_FILE.match(p.name):
            with contextlib.suppress(OSError):
                os.unlink(p)
    return root / MANIFEST
