"""Log files a process writes besides the console: a run's log (a run folder's train.log or
cache.log) and each command's own log. One of each kind at a time: a process that writes several
runs in a row (the ablation) moves its run log to the next run's file rather than writing all of
them into every file."""
from __future__ import annotations

import logging
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def attach_log(path: Path, kind: str, mode: str = "a") -> logging.Handler:
    """The root logger's handler of `kind` now writes to `path` (the previous one of that kind is
    closed); the root logs INFO and above. A path that is not a regular file (a symlink, FIFO,
    folder...) is refused as every output is (mcad.io.output_target), before anything is closed."""
    from mcad.io import output_target

    path = output_target(path)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_mcad_log_kind", None) == kind]:
        root.removeHandler(old)
        old.close()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    h = logging.FileHandler(path, mode=mode, encoding="utf-8")
    h._mcad_log_kind = kind
    h.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(h)
    root.setLevel(logging.INFO)
    return h


def add_file_log(path: Path) -> None:
    """Send the log to the run's file `path` from now on."""
    attach_log(path, "run")
