"""Run folders: where a trained student and everything made from it live (docs/interfaces.md)."""
from __future__ import annotations

from pathlib import Path

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
    """(model in eval mode, tokenizer) of a run folder."""
    from mcad.models.checkpoint import check_tokenizer, load_model
    from mcad.tokenizer import Tokenizer

    run = resolve_run(run)
    model, tok = load_model(run / STUDENT), Tokenizer.load(run / TOKENIZER)
    check_tokenizer(model.config, tok, run / STUDENT, run / TOKENIZER)
    return model, tok


def latest_run(root: str | Path = "runs", exclude: tuple[str, ...] = ("teachers",)) -> Path:
    cands = [p.parent for p in Path(root).glob(f"*/{STUDENT}") if p.parent.name not in exclude]
    if not cands:
        raise FileNotFoundError(f"{root}: no run folder with a {STUDENT} (run `make student` first)")
    return max(cands, key=lambda p: (p / STUDENT).stat().st_mtime)
