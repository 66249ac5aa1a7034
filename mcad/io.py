"""Atomic writes, hashing and manifests: nothing half-written is ever left under a final name."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import stat
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger("mcad.io")

_TMP_SUFFIX = ".tmp"
# .<name>.<pid>.<random>.tmp: the writer's pid lets a later process tell a killed save's leftover
# from a save in flight (swept only when that pid is gone)
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")
# the pre-pid form (.<name>.<random>.tmp, mkstemp's 8 characters): swept once it is an hour old
_OLD_TMP_NAME = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")
OLD_TMP_AGE_S = 3600
_swept: set[str] = set()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale_tmp(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files that killed saves left in `folder` (not those of saves in flight);
    returns what it removed. Each folder is swept once per process."""
    folder = Path(folder)
    key = str(folder.resolve()) if folder.exists() else str(folder)
    if key in _swept or not folder.is_dir():
        return []
    _swept.add(key)
    removed = []
    now = time.time()
    with os.scandir(folder) as it:
        for e in it:
            if not e.name.endswith(_TMP_SUFFIX) or not e.name.startswith(".") or not e.is_file(follow_symlinks=False):
                continue
            m = _TMP_NAME.match(e.name)
            if m:
                stale = int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"]))
            else:
                stale = bool(_OLD_TMP_NAME.match(e.name)) and now - e.stat().st_mtime > OLD_TMP_AGE_S
            if stale:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
                    removed.append(Path(e.path))
    if removed:
        log.info("%s: removed %d temp file(s) of interrupted saves", folder, len(removed))
    return removed


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FOLLOW_ENV = "MCAD_FOLLOW_SYMLINKS"


class OutputRefused(ValueError):
    """An output path the tool will not write: not a regular file it can replace."""


def output_target(path: str | os.PathLike) -> Path:
    """The regular file a write to `path` replaces. The atomic rename would put a new regular file in
    place of whatever is there, so a device, FIFO, socket or folder is refused, and so is a symlink
    (it would be replaced, not followed) unless MCAD_FOLLOW_SYMLINKS=1 asks to write where it points."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    except NotADirectoryError:
        raise OutputRefused(f"{path}: a parent of this output path is not a folder") from None
    if stat.S_ISLNK(st.st_mode):
        if os.environ.get(FOLLOW_ENV) != "1":
            raise OutputRefused(f"{path}: is a symlink (to {os.readlink(path)}); the tool writes only regular files: "
                                f"give the real path, or set {FOLLOW_ENV}=1 to write where it points")
        return output_target(path.resolve())
    if stat.S_ISREG(st.st_mode):
        return path
    kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file")
    raise OutputRefused(f"{path}: is {kind}; the tool writes only regular files: give a file path")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds.

    The file is fsynced before the rename (a crash leaves the old file or the whole new one) and
    gets the mode a plain open() would give it: the existing file's, else 0666 less the umask
    (mkstemp makes its temp files 0600). Only a regular file (or nothing) is replaced (output_target)."""
    path = output_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_tmp(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=_TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():
            _fsync_file(tmp_path)
            try:
                mode = path.stat().st_mode & 0o7777
            except FileNotFoundError:
                mode = 0o666 & ~_umask()
            os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as e:
        named = _name_write_error(e, path, tmp_path)
        if named is None:
            raise
        raise named from e
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


class WriteFailed(OSError):
    """A save that stopped part way through (torch's writer on a full disk): names the file."""


# what torch's zip writer raises when a write comes up short (a full disk), naming no file
_TORN_WRITE = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def _name_write_error(e: BaseException, path: Path, tmp: Path) -> BaseException | None:
    """The error of a failed atomic write, naming the file it was for (a write error names no
    file, and the temp file's name means nothing to the user); None: raise `e` as it is."""
    if isinstance(e, OSError):
        if e.errno is None or e.filename not in (None, str(tmp), tmp):
            return None  # mcad's own line, or about another file (an input read inside the block)
        return OSError(e.errno, e.strerror, str(path))
    text = " ".join(str(e).split())
    if not any(marker in text for marker in _TORN_WRITE):
        return None
    import shutil

    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free on its disk"
    except OSError:
        free = "check the free space on its disk"
    return WriteFailed(None, f"could not be written, the save stopped part way ({text}); {free}: free space "
                             f"(or write elsewhere) and run the command again", str(path))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
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
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
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


class FolderBusy(ValueError):
    """Another live process holds the folder's lock."""


LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str, remove: bool = False) -> Iterator[Path]:
    """One writer per folder: an exclusive flock on `<folder>/.lock` for the block, which records the
    holder's pid and command so that a refused writer can name it. The kernel drops the lock when the
    holder dies, so a killed run never leaves its folder locked."""
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    fd = os.open(output_target(lock), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "another process"
            raise FolderBusy(f"{folder}: {holder} is writing this folder; wait for it to end or give another "
                             f"folder (one writer per folder)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"mcad {command} (pid {os.getpid()})".encode(), 0)
        try:
            yield folder
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                if remove:  # a folder whose every file is recorded (an export's) keeps no lock file
                    os.unlink(lock)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
