"""`mcad eval CHECKPOINT`: retrieval metrics of a dual model, and re-ranking by a fusion model.

The output names the split evaluated, its file(s) and size; `json=` records them under "data" beside
the rows. A CSV or shard path given once for every split is evaluated only with `split=` named."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from mcad.accelerator import autocast, model_device
from mcad.data.stream import as_images, image_batch
from mcad.preprocess import model_input, view_of
from mcad.retrieval import recall_table, rerank_metrics, retrieval_metrics

log = logging.getLogger("mcad.eval")


@torch.no_grad()
def encode_images(model, pixels, batch_size: int | None = None) -> torch.Tensor:
    """Unit embeddings [N, D] (float32, CPU) of images (mcad.data.stream.Images as the model sees
    them, or a uint8 array), computed where the model is while the loader decodes the next batch;
    `batch_size` None: mcad.data.stream.image_batch of the model's size."""
    model.eval()
    dev = model_device(model)
    bs = batch_size or image_batch(int(model.image_size))
    with autocast(dev):
        out = [model.encode_image(model_input(model, px).to(dev)).float().cpu()
               for px in as_images(pixels).as_view(view_of(model)).chunks(bs)]
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model, ids: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    dev = model_device(model)
    with autocast(dev):
        return torch.cat([model.encode_text(torch.as_tensor(ids[s:s + batch_size]).to(dev)).float().cpu()
                          for s in range(0, len(ids), batch_size)])


@torch.no_grad()
def image_keys(corpus) -> np.ndarray:
    """An id per image such that equal ids mean 'same description' (synthetic scenes); else unique."""
    if corpus.meta and all("scene" in m for m in corpus.meta):
        keys = [json.dumps(m["scene"], sort_keys=True) for m in corpus.meta]
    else:
        keys = list(corpus.image_paths)
    _, inv = np.unique(np.array(keys), return_inverse=True)
    return inv.astype(np.int64)


def evaluate_dual(model, pixels, ids, caption_to_image) -> tuple[dict, torch.Tensor]:
    img, txt = encode_images(model, pixels), encode_texts(model, ids)
    sim = img @ txt.T
    return retrieval_metrics(sim, caption_to_image), sim


@torch.no_grad()
def evaluate_rerank(fusion, pixels, ids, caption_to_image, sim, k: int = 16, batch_size: int = 512) -> dict:
    """Re-rank each row's top-k under `sim` (the dual model's) by the fusion model's ITM logit.
    `ids`: the captions as the fusion model reads them (its own tokenizer's)."""
    fusion.eval()
    dev = model_device(fusion)
    with autocast(dev):
        img_tok = torch.cat([fusion.image_tokens(model_input(fusion, px).to(dev))
                             for px in as_images(pixels).as_view(view_of(fusion)).chunks(image_batch(fusion.image_size))])
        ids_t = torch.as_tensor(ids).to(dev)
        txt_tok = torch.cat([fusion.text_tokens(ids_t[s:s + 1024]) for s in range(0, len(ids_t), 1024)])

    def scorer(i, t):
        with autocast(dev):
            _, m = fusion.score_pairs(img_tok, txt_tok, ids_t, torch.as_tensor(i), torch.as_tensor(t), batch_size)
        return m.float().cpu().numpy()

    return rerank_metrics(sim, caption_to_image, scorer, scorer, k)


# `mcad eval [CHECKPOINT] key=value ...`: None = derived (tokenizer: beside the checkpoint). The data
# and teacher specs are those of the training commands (mcad.data.spec, mcad.teacher_spec); a
# fusion teacher given re-ranks the dual model's top-k.
def eval_options() -> dict:
    from mcad.data.spec import DATA_DEFAULTS
    from mcad.teacher_spec import TEACHER_DEFAULTS

    return {"data": dict(DATA_DEFAULTS), **{r: dict(v) for r, v in TEACHER_DEFAULTS.items()}, "split": "test",
            "k": 16, "tokenizer": None, "json": None, "device": "auto", "workers": None}


DATA_RECORD = "data"  # the json's entry saying what was evaluated (mcad.data.spec.split_record); the others are rows
EVAL_TYPES = {"tokenizer": str, "json": str, "workers": int}  # paths: kept as text
USAGE = ("usage: mcad eval CHECKPOINT | dual.source=hf-clip dual.path=FOLDER  [fusion=FUSION.safetensors | "
         "fusion.source=hf-blip-itm fusion.path=FOLDER] [data=data/synth | data.format=... data.json=...] "
         "[split=test] [k=16] [tokenizer=PATH] [json=OUT.json] [device=auto]")


def parse_args(argv: list[str]):
    from mcad.config import parse_overrides
    from mcad.teacher_spec import parse, shorthands

    p = parse_overrides(argv, eval_options(), positional=1, types=EVAL_TYPES, shorthands=shorthands())
    if not p.positional and parse("dual", p.config["dual"]).is_default:
        raise ValueError(USAGE)
    ignored = sorted(k for k in p.given if k == "dual" or k.startswith("dual."))
    if p.positional and ignored:  # the checkpoint is the model evaluated: a dual= beside it would be ignored
        raise ValueError(f"dual={p.config['dual'].get('path') or p.config['dual'].get('source')}: the checkpoint "
                         f"{p.positional[0]} is the model evaluated; give the checkpoint or dual=..., not both")
    return (Path(p.positional[0]) if p.positional else None), p.config, p.given


def load_evaluated(ckpt: Path | None, kv: dict):
    """(name, dual model, its tokenizer, the fusion model it is, if a fusion checkpoint) under evaluation."""
    from mcad.models.checkpoint import check_tokenizer, load_model
    from mcad.teacher_spec import load_one, parse
    from mcad.tokenizer import Tokenizer

    if ckpt is None:
        spec = parse("dual", kv["dual"])
        model, tok, tok_file = load_one(spec, Path("."))
        if tok is None:
            tok_file = Path(kv["tokenizer"] or tok_file)
            tok = Tokenizer.load(tok_file)
            check_tokenizer(model.config, tok, spec.path, tok_file)
        return Path(spec.path).stem or spec.path, model, tok, None
    from mcad.runs import STUDENT

    # a run folder holds its checkpoint and its tokenizer; a checkpoint file has its tokenizer beside it
    folder = ckpt if ckpt.is_dir() else ckpt.parent
    model = load_model(ckpt / STUDENT if ckpt.is_dir() and (ckpt / STUDENT).is_file() else ckpt)
    tok_path = Path(kv["tokenizer"] or folder / "tokenizer.json")
    tok = Tokenizer.load(tok_path)
    check_tokenizer(model.config, tok, ckpt, tok_path)  # another vocabulary: wrong ids, or an IndexError
    name = ckpt.name if ckpt.is_dir() else ckpt.stem
    if model.kind == "fusion":
        return name, model.dual, tok, model
    return name, model, tok, None


def check_writable(path: Path, key: str) -> None:
    """One line now for an output path the command could not write at its end: not a regular file
    (mcad.io.output_target), or in a folder where no file can be made (tried: a permission check
    says yes to root even where nothing can be created, e.g. under /proc)."""
    import os
    import tempfile

    from mcad.io import OutputRefused, output_target

    if path.is_dir() and not path.is_symlink():
        raise ValueError(f"{key}={path}: is a folder; give a file name (e.g. {path / 'eval.json'})")
    parent = path.parent if str(path.parent) else Path(".")
    existing = next((p for p in (parent, *parent.parents) if p.exists()), Path("."))
    why = None if existing.is_dir() else f"{existing} is not a folder"
    if why is None:
        try:
            fd, probe = tempfile.mkstemp(prefix=".mcad-probe.", dir=existing)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            why = f"nothing can be created in {existing}: {e.strerror}"
    if why is None and path.exists() and not os.access(path, os.W_OK):
        why = f"{path} is not writable"
    if why:
        raise ValueError(f"{key}={path}: cannot be written ({why}); give a path in a folder you can write")
    try:
        output_target(path)
    except OutputRefused as e:
        raise ValueError(f"{key}={e}") from None


def check_k(kv: dict, given: dict, reranks: bool) -> int:
    """k: the depth the fusion model re-ranks; given without a fusion model it would do nothing."""
    k = int(kv["k"])  # its range (k >= 1) is mcad.config's, checked when parsed
    if "k" in given and not reranks:
        raise ValueError(f"k={k}: the depth a fusion model re-ranks, and there is none; give fusion=<fusion "
                         f"checkpoint> (or a fusion checkpoint to evaluate), or leave k out")
    return k


def main(argv: list[str]) -> int:
    from mcad.accelerator import place, resolve_device
    from mcad.data.spec import check_eval_split, open_split, parse as parse_data, split_line, split_record
    from mcad.teacher_spec import load_one, parse

    ckpt, kv, given = parse_args(argv)
    if kv["json"]:  # an unwritable json= is found now, not after the whole evaluation
        check_writable(Path(kv["json"]), "json")
    device = resolve_device(kv["device"])
    data = parse_data(kv["data"])
    check_eval_split(data, kv["split"], "split", named="split" in given)
    name, dual, tok, own_fusion = load_evaluated(ckpt, kv)
    fspec = parse("fusion", kv["fusion"])
    fusion, ftok, f_name = own_fusion, None, name
    if not fspec.is_default:  # a fusion teacher given (checked before any work): it re-ranks with its own tokenizer
        fusion, ftok, _ = load_one(fspec, Path("."))
        f_name = Path(fspec.path).stem
    k = check_k(kv, given, fusion is not None)
    pixels, corpus = open_split(data, kv["split"], view_of(dual), kv["workers"], split_key="split")
    ids = tok.encode_batch(corpus.captions)
    metrics, sim = evaluate_dual(place(dual, device), pixels, ids, corpus.caption_to_image)
    rows = {name if name != DATA_RECORD else f"{name} (model)": metrics}
    f_ids = (ftok or tok).encode_batch(corpus.captions) if ftok is not None else ids
    if fusion is not None:
        rows[f"{f_name} re-rank top-{k}"] = evaluate_rerank(place(fusion, device), pixels, f_ids,
                                                           corpus.caption_to_image, sim, k)
    record = split_record(corpus, data)
    print(split_line(record))
    print(recall_table(rows))
    if kv["json"]:
        from mcad.io import write_json

        write_json(kv["json"], {**rows, DATA_RECORD: record})
    return 0
