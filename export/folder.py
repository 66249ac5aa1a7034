"""An export folder belongs to the tool only as far as its manifest says: an export deletes what
the previous export there recorded and this one did not write again, never anything else, and
refuses a folder holding files it did not make (a user's `out=` pointing at their own folder)."""
from __future__ import annotations

import logging
from pathlib import Path

from mcad.artifacts import MANIFEST

log = logging.getLogger("mcad.export")


def recorded(out: Path) -> set[str] | None:
    """The file names the folder's export manifest lists (artifacts, tokenizer, golden, itself);
    None when the folder has no mcad export manifest. Read leniently: a manifest of an older
    version still says which files that export wrote."""
    from mcad.io import read_json

    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        m = read_json(path)
    except ValueError:
        return None
    if not isinstance(m, dict) or not isinstance(m.get("artifacts"), list) or "target" not in m:
        return None
    names = {MANIFEST}
    names.update(a["file"] for a in m["artifacts"] if isinstance(a, dict) and isinstance(a.get("file"), str))
    names.update(m[k] for k in ("tokenizer", "golden") if isinstance(m.get(k), str))
    return {n for n in names if Path(n).name == n}  # names in the folder only, never a path out of it


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
    foreign = sorted(p.name for p in out.iterdir() if p.name not in planned and not _temp(p.name))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ValueError(f"out={out}: holds files mcad export did not write ({shown}) and no export manifest; "
                         f"give an empty or new folder")
    return set()


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
