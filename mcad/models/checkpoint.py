"""Weights as safetensors with the model config in the file's metadata (and beside it as JSON),
written atomically; a corrupt or foreign file gets one clear line."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mcad.io import atomic_path, write_json


class CheckpointError(ValueError):
    pass


def save_model(model, path: str | Path, extra: dict | None = None) -> Path:
    """Write `path` (.safetensors) and `path` with .config.json; returns the weights path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(model.config), "format": "mcad-model-v1"}
    if extra:
        meta["extra"] = json.dumps(extra)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    write_json(config_path(path), model.config)
    return path


def config_path(weights: Path) -> Path:
    return weights.with_name(weights.name[: -len(".safetensors")] + ".config.json")


def read_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors checkpoint ({e})") from None
    if "config" not in meta:
        raise CheckpointError(f"{path}: safetensors file without an mcad model config in its metadata")
    return meta


def load_model(path: str | Path, map_location: str = "cpu"):
    from mcad.models.registry import build_model

    path = Path(path)
    if path.is_dir():
        cands = sorted(path.glob("*.safetensors"))
        if len(cands) != 1:
            raise CheckpointError(f"{path}: expected one .safetensors checkpoint, found {len(cands)}")
        path = cands[0]
    meta = read_metadata(path)
    config = json.loads(meta["config"])
    model = build_model(config)
    try:
        state = load_file(str(path), device=map_location)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match config {config.get('name', '?')} "
                              f"(missing {len(missing)}, unexpected {len(unexpected)}: "
                              f"{(missing + unexpected)[:3]})")
    model.eval()
    return model


def state_dict_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
