"""`mcad eval CHECKPOINT`: retrieval metrics of a dual model, and re-ranking by a fusion model."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from mcad.data.images import normalize
from mcad.retrieval import recall_table, rerank_metrics, retrieval_metrics

log = logging.getLogger("mcad.eval")


@torch.no_grad()
def encode_images(model, pixels: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    out = [model.encode_image(normalize(pixels[s:s + batch_size], model.image_mean, model.image_std))
           for s in range(0, len(pixels), batch_size)]
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model, ids: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model.encode_text(torch.as_tensor(ids[s:s + batch_size]))
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
    """Re-rank each row's top-k under `sim` (the dual model's) by the fusion model's ITM logit."""
    fusion.eval()
    img_tok = torch.cat([fusion.image_tokens(normalize(pixels[s:s + 256], fusion.dual.image_mean, fusion.dual.image_std))
                         for s in range(0, len(pixels), 256)])
    ids_t = torch.as_tensor(ids)
    txt_tok = torch.cat([fusion.text_tokens(ids_t[s:s + 1024]) for s in range(0, len(ids_t), 1024)])

    def scorer(i, t):
        _, m = fusion.score_pairs(img_tok, txt_tok, ids_t, torch.as_tensor(i), torch.as_tensor(t), batch_size)
        return m.numpy()

    return rerank_metrics(sim, caption_to_image, scorer, scorer, k)


# `mcad eval CHECKPOINT key=value ...`: None = derived (tokenizer: beside the checkpoint)
EVAL_OPTIONS = {"fusion": None, "data": "data/synth", "split": "test", "k": 16, "tokenizer": None, "json": None}
EVAL_TYPES = {"fusion": str, "tokenizer": str, "json": str}  # paths: kept as text


def parse_args(argv: list[str]):
    from mcad.config import parse_overrides

    p = parse_overrides(argv, EVAL_OPTIONS, positional=1, types=EVAL_TYPES)
    if not p.positional:
        raise ValueError("usage: mcad eval CHECKPOINT [fusion=FUSION.safetensors] [data=data/synth] [split=test] "
                         "[k=16] [tokenizer=PATH] [json=OUT.json]")
    return Path(p.positional[0]), p.config


def main(argv: list[str]) -> int:
    from mcad.data.images import load_images
    from mcad.data.karpathy import load_karpathy
    from mcad.models.checkpoint import check_tokenizer, load_model
    from mcad.tokenizer import Tokenizer

    ckpt, kv = parse_args(argv)
    model = load_model(ckpt)
    tok_path = Path(kv["tokenizer"] or ckpt.parent / "tokenizer.json")
    tok = Tokenizer.load(tok_path)
    check_tokenizer(model.config, tok, ckpt, tok_path)  # another vocabulary: wrong ids, or an IndexError
    data = Path(kv["data"])
    corpus = load_karpathy(data / "dataset_synth.json" if data.is_dir() else data, split=kv["split"])
    pixels, corpus = load_images(corpus, model.image_size if hasattr(model, "image_size") else model.dual.image_size)
    ids = tok.encode_batch(corpus.captions)
    dual = model if model.kind == "dual" else model.dual
    metrics, sim = evaluate_dual(dual, pixels, ids, corpus.caption_to_image)
    rows = {ckpt.stem: metrics}
    fusion_path = kv.get("fusion") or (ckpt if model.kind == "fusion" else None)
    if fusion_path:
        fusion = model if model.kind == "fusion" else load_model(fusion_path, kind="fusion", role="fusion=")
        k = int(kv["k"])
        rows[f"{Path(fusion_path).stem} re-rank top-{k}"] = evaluate_rerank(fusion, pixels, ids, corpus.caption_to_image, sim, k)
    print(recall_table(rows))
    if kv["json"]:
        from mcad.io import write_json

        write_json(kv["json"], rows)
    return 0
