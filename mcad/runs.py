"""Run folders: where a trained student and everything made from it live (docs/interfaces.md)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from mcad.models.checkpoint import CheckpointError

STUDENT = "student.safetensors"
TOKENIZER = "tokenizer.json"


def resolve_run(run: str | Path) -> Path:
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder (make student writes runs/<name>/)")
    if not (run / STUDENT).exists():
        raise CheckpointError(f"{run}: run folder has no {STUDENT} (run `make student` first)")
    if not (run / TOKENIZER).exists():
        raise CheckpointError(f"{run}: run folder has no {TOKENIZER}")
    return run


def load_student(run: str | Path):
    """(model in eval mode, tokenizer) of a run folder; the model's `image_view` is the view its
    run recorded (the dual teacher's: size and resize rule), so every stage decodes images as training did."""
    from mcad.models.checkpoint import check_tokenizer, load_model
    from mcad.preprocess import view_of_record
    from mcad.tokenizer import Tokenizer

    run = resolve_run(run)
    model, tok = load_model(run / STUDENT), Tokenizer.load(run / TOKENIZER)
    check_tokenizer(model.config, tok, run / STUDENT, run / TOKENIZER)
    model.image_view = view_of_record(run_record(run).get("preprocess"), model.image_size)
    return model, tok


def run_record(run: str | Path) -> dict:
    """The run's manifest.json (teachers, preprocess, tokenizer), or {} for a run from before it."""
    import json

    f = Path(run) / "manifest.json"
    try:
        return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable run manifest ({type(e).__name__}); re-run `make student`") from None


def latest_run(root: str | Path = "runs", exclude: tuple[str, ...] = ("teachers",)) -> Path:
    cands = [p.parent for p in Path(root).glob(f"*/{STUDENT}") if p.parent.name not in exclude]
    if not cands:
        raise FileNotFoundError(f"{root}: no run folder with a {STUDENT} (run `make student` first)")
    return max(cands, key=lambda p: (p / STUDENT).stat().st_mtime)


def run_dir(out: str | Path, name: str) -> Path:
    """out=/name=: the run's folder, refused in one line where `name` would leave `out` or be `out`
    itself (the same rule mcad.config applies to a `name=` given on the command line)."""
    from mcad.ranges import run_name_problem

    problem = run_name_problem(str(name))
    if problem:
        raise ValueError(f"name={name}: {problem}")
    return Path(out) / str(name)


@contextlib.contextmanager
def run_folder_lock(run: str | Path, command: str) -> Iterator[Path]:
    """One writer per run folder: held for the whole run, so a second `mcad <command>` into the same
    folder is refused in one line naming the holder's pid (mcad.io.folder_lock) instead of both
    writing the same files. Take it before anything is written there (its log included). In a
    torchrun job only rank 0 takes it (RANK, set before the process group exists): the other ranks
    are the same run."""
    import os

    from mcad.io import folder_lock

    if int(os.environ.get("RANK") or 0) != 0:
        yield Path(run)
        return
    with folder_lock(run, command) as folder:
        yield folder
