"""An export folder belongs to the tool only as far as its manifest says: an export deletes what
the previous export there recorded and this one did not write again, never anything else, and
refuses a folder holding files it did not make (a user's `out=` pointing at their own folder).

The manifest is the folder's seal: a re-export first moves the previous manifest aside (RETIRED,
which readers do not open, so they refuse the folder while files change under it) and writes the
new one last, atomically, once every file it lists is in place. An export that fails in a folder it
made removes what it wrote there and the folder."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from mcad.artifacts import MANIFEST
from mcad.io import LOCK_NAME as LOCK

log = logging.getLogger("mcad.export")

RETIRED = ".manifest.previous.json"  # the previous export's record while a re-export runs
PENDING = ".export.pending.json"     # a first export's planned files, written before any of them


def recorded(out: Path) -> set[str] | None:
    """The file names the folder's export manifest lists (artifacts, tokenizer, golden, itself), or
    while a re-export runs (or after one was killed) the previous manifest's; None when the folder
    has neither. Read leniently: a manifest of an older version still says which files that export wrote."""
    from mcad.io import read_json

    for name in (MANIFEST, RETIRED):
        path = out / name
        if not path.is_file():
            continue
        try:
            m = read_json(path)
        except ValueError:
            continue
        if not isinstance(m, dict) or not isinstance(m.get("artifacts"), list) or "target" not in m:
            continue
        names = {MANIFEST}
        names.update(a["file"] for a in m["artifacts"] if isinstance(a, dict) and isinstance(a.get("file"), str))
        names.update(m[k] for k in ("tokenizer", "golden") if isinstance(m.get(k), str))
        return {n for n in names if Path(n).name == n}  # names in the folder only, never a path out of it
    return None


def claim(out: Path, planned: set[str]) -> set[str]:
    """What the previous export in `out` recorded (empty for a new folder). A folder without an
    export manifest is taken only when it holds nothing but what this export writes itself (an
    interrupted first export); anything else is the user's and refused."""
    if not out.exists():
        return set()
    if not out.is_dir():
        raise ValueError(f"out={out}: not a folder")
    prev = recorded(out)
    if prev is not None:
        return prev
    ours = pending(out)  # a killed first export's files are named in its pending record, a user's are not
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in ours and p.name not in (PENDING, LOCK) and not _temp(p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ValueError(f"out={out}: holds files mcad export did not write ({shown}) and no export manifest; "
                         f"give an empty or new folder")
    return set()


def pending(out: Path) -> set[str]:
    """The file names a first export in `out` planned (its pending record), or none."""
    from mcad.io import read_json

    try:
        names = read_json(out / PENDING)
    except (FileNotFoundError, ValueError):
        return set()
    return {n for n in names if isinstance(n, str) and Path(n).name == n} if isinstance(names, list) else set()


def begin(out: Path, planned: set[str] = frozenset()) -> list[Path]:
    """Make `out` (returns the folders made, innermost first) and move a previous manifest aside; a
    first export (no manifest) records the files it plans before writing any, so that a killed one's
    leftovers can be told from a user's own files."""
    from mcad.io import write_json

    made = []
    p = Path(out)
    while not p.exists():
        made.append(p)
        p = p.parent
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():
        os.replace(out / MANIFEST, out / RETIRED)
    elif not (out / RETIRED).is_file():
        write_json(out / PENDING, sorted(set(planned) | pending(out)))
    return made


def commit(out: Path, manifest: dict, previous: set[str]) -> None:
    """Write the manifest (atomically, last), then remove what the previous export recorded and this
    one did not write again, and the previous record."""
    from mcad.io import write_json

    write_json(out / MANIFEST, manifest)
    clean(out, previous, recorded(out) or set())
    (out / RETIRED).unlink(missing_ok=True)
    (out / PENDING).unlink(missing_ok=True)


def abandon(out: Path, made: list[Path], planned: set[str]) -> None:
    """A failed export: in a folder it made, remove the files it wrote there and the folders it
    made (when nothing else is in them); a folder that was there stays as it is, without a manifest."""
    if not made:
        return
    for p in out.iterdir() if out.is_dir() else ():
        if p.is_file() and (p.name in planned or p.name in (PENDING, LOCK) or _temp(p.name)):
            p.unlink(missing_ok=True)
    for d in made:
        try:
            d.rmdir()
        except OSError:  # not empty (someone else's files) or gone
            break


def clean(out: Path, previous: set[str], written: set[str]) -> list[Path]:
    """Remove what the previous export recorded and this one did not write again."""
    removed = []
    for name in sorted(previous - written):
        p = out / name
        if p.is_file():
            p.unlink()
            removed.append(p)
    if removed:
        log.info("%s: removed %d file(s) of the previous export: %s", out, len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def _temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")  # mcad.io.atomic_path's temp files
