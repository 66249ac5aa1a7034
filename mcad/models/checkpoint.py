"""Weights as safetensors with the model config in the file's metadata (and beside it as JSON),
written atomically; a corrupt or foreign file gets one clear line.

Saving is deterministic (same weights and config -> same bytes: safetensors writes its metadata
in hash-map order, so the header is rewritten with sorted keys), and the file records the sha256
of its content (`content_sha256`: tensors in name order + the other metadata), verified on load:
a file with flipped bytes is refused instead of evaluating as garbage. Weights holding NaN or inf
are never written. Saved with its tokenizer, the file also records the tokenizer's content hash
(`tokenizer_sha256`: vocabulary, merges, normalisation), which `check_tokenizer` compares: a
tokenizer of the same size but other ids is refused. Files saved without it keep the size check."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from mcad.io import atomic_write_bytes, write_json

HASH_KEY = "content_sha256"
TOKENIZER_KEY = "tokenizer_sha256"


class CheckpointError(ValueError):
    pass


def save_model(model, path: str | Path, extra: dict | None = None, tokenizer=None) -> Path:
    """Write `path` (.safetensors) and `path` with .config.json; returns the weights path.
    `tokenizer`: the one the model reads (its content hash is recorded; a model loaded from a file
    that recorded one keeps it). Non-finite weights are refused with one line."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: not written: weights hold NaN or inf ({', '.join(bad[:3])}"
                              f"{f' and {len(bad) - 3} more' if len(bad) > 3 else ''}); the training diverged: "
                              "check the loss settings or lower lr=")
    meta = {"config": json.dumps(model.config), "format": "mcad-model-v1"}
    if extra:
        meta["extra"] = json.dumps(extra, sort_keys=True)
    tok_hash = tokenizer.content_sha256() if tokenizer is not None else getattr(model, "tokenizer_sha256", None)
    if tok_hash:
        meta[TOKENIZER_KEY] = tok_hash
    meta[HASH_KEY] = content_digest(state, meta)
    atomic_write_bytes(path, canonical_header(save(state, metadata=meta)))
    write_json(config_path(path), model.config)
    return path


def content_digest(state: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """sha256 over the tensors (name, dtype, shape, bytes; in name order) and the metadata other
    than the digest itself: what the file holds, not how safetensors lays it out."""
    h = hashlib.sha256()
    for k in sorted(meta):
        if k != HASH_KEY:
            h.update(f"meta {k}={meta[k]}\0".encode())
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(f"tensor {k}|{t.dtype}|{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def canonical_header(data: bytes) -> bytes:
    """The same safetensors bytes with the header's keys in sorted order (the data, whose offsets
    are relative to the end of the header, is unchanged), padded to 8 bytes as safetensors does."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    canon = ({"__metadata__": dict(sorted(meta.items()))} if meta else {}) | dict(sorted(header.items()))
    text = json.dumps(canon, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


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


def load_model(path: str | Path, map_location: str = "cpu", kind: str | None = None, role: str = ""):
    """The model in eval mode. `kind` ("dual" or "fusion"): what the caller needs; another kind is
    refused with one line (`role`, e.g. "fusion=", says which argument was wrong)."""
    from mcad.models.registry import build_model

    path = Path(path)
    if path.is_dir():
        cands = sorted(path.glob("*.safetensors"))
        if len(cands) != 1:
            raise CheckpointError(f"{path}: expected one .safetensors checkpoint, found {len(cands)}")
        path = cands[0]
    meta = read_metadata(path)
    try:
        state = load_file(str(path), device=map_location)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt checkpoint ({e})") from None
    verify_digest(path, state, meta)
    try:
        config = json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: damaged model config in the metadata ({e.msg})") from None
    check_kind(path, config, kind, role)
    model = build_model(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match config {config.get('name', '?')} "
                              f"(missing {len(missing)}, unexpected {len(unexpected)}: "
                              f"{(missing + unexpected)[:3]})")
    model.tokenizer_sha256 = meta.get(TOKENIZER_KEY)  # kept when the model is saved again
    model.eval()
    return model


def verify_digest(path: Path, state: dict, meta: dict) -> None:
    """Same-size corruption passes every structural check: the recorded content hash does not.
    (Files saved before the hash was recorded have none and are taken as they are.)"""
    want = meta.get(HASH_KEY)
    if want is not None and content_digest(state, meta) != want:
        raise CheckpointError(f"{path}: content does not match the sha256 recorded when it was saved "
                              "(the file is damaged; copy or train it again)")


def check_kind(path: Path, config: dict, kind: str | None, role: str = "") -> None:
    have = config.get("type")
    if kind is not None and have != kind:
        what = f" for {role}" if role else ""
        raise CheckpointError(f"{path}: a {have} model ({config.get('name', '?')}), expected a {kind} "
                              f"model{what} (a fusion checkpoint is e.g. runs/teachers/fusion.safetensors)")


def recorded_tokenizer(model_path) -> str | None:
    """The tokenizer content hash a model file recorded when saved (None: none recorded, or not
    an mcad safetensors file: e.g. a checkpoint saved before the hash existed)."""
    path = Path(model_path) if model_path is not None else None
    if path is not None and path.is_dir():
        cands = sorted(path.glob("*.safetensors"))
        path = cands[0] if len(cands) == 1 else None
    if path is None or path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        return read_metadata(path).get(TOKENIZER_KEY)
    except CheckpointError:
        return None


def check_tokenizer(model_config: dict, tok, model_path, tok_path) -> None:
    """A tokenizer of another vocabulary or context length than the model's text tower gives
    wrong ids silently (or an IndexError deep in the embedding): refuse it with one line. Where the
    model file recorded its tokenizer's content hash, the content is compared too (same size,
    other ids: refused); older files without it get the size and special-id check only."""
    text = (model_config.get("dual") or model_config).get("text") if model_config.get("type") == "fusion" \
        else model_config.get("text")
    if not text:
        return
    want = {"vocab_size": text.get("vocab_size"), "context_length": text.get("context_length"),
            "eot_id": text.get("eot_id"), "pad_id": text.get("pad_id")}
    have = {"vocab_size": tok.vocab_size, "context_length": tok.context_length, "eot_id": tok.eot_id,
            "pad_id": tok.pad_id}
    diff = [f"{k} {have[k]} vs {want[k]}" for k in want if want[k] is not None and int(want[k]) != int(have[k])]
    want_hash = recorded_tokenizer(model_path) if not diff else None
    if want_hash and hasattr(tok, "content_sha256") and tok.content_sha256() != want_hash:
        diff = [f"same sizes, other vocabulary or merges: content sha256 {tok.content_sha256()[:12]} vs "
                f"{want_hash[:12]} recorded with the model"]
    if diff:
        raise CheckpointError(f"{tok_path}: tokenizer does not match {model_path} ({', '.join(diff)}); "
                              "use the tokenizer.json saved with the checkpoint (tokenizer=...)")
