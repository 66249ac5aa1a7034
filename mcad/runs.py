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
