"""Atomic writes, hashing and manifests: nothing half-written is ever left under a final name."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str | os.PathLike, root: str | os.PathLike | None = None) -> dict:
    path = Path(path)
    name = str(path.relative_to(root)) if root is not None else path.name
    return {"path": name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def versions() -> dict[str, str]:
    """Versions of the libraries an artifact depends on (absent ones are left out)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("mcad", "torch", "executorch", "torchao", "numpy", "tokenizers", "transformers",
                 "onnx", "onnxruntime", "ai-edge-litert", "litert-torch", "ai-edge-quantizer",
                 "faiss-cpu", "qai-hub", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def machine() -> str:
    return f"{platform.node() or 'host'} {platform.machine()} {os.cpu_count()} cpu {platform.system()}"


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def write_manifest(path: str | os.PathLike, *, kind: str, config: dict, files: list[str | os.PathLike],
                   root: str | os.PathLike | None = None, **extra: Any) -> Path:
    """Every artifact gets one: what made it (config), what it is (hashes, sizes), with what (versions)."""
    root = Path(root) if root is not None else Path(path).parent
    manifest = {
        "kind": kind,
        "created": now_iso(),
        "machine": machine(),
        "versions": versions(),
        "config": config,
        "files": [file_entry(f, root) for f in files],
        **extra,
    }
    return write_json(path, manifest)
