"""The writing side of the teacher cache (`mcad cache`; the format and the reader: `distill.cache`).

Shards of `shard_images` images are written as they fill, each recorded in partial.json with its
sha256 and a key of everything it depends on, so a killed build resumes from the shards it
finished. F's fused features (h, h_img, h_txt) are computed and stored only for a cache built
with `fused=True` (`mcad cache` with loss.lam > 0: the modified features read them); its ITM
logits always.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mcad import distributed
from mcad.evaluate import encode_images, encode_texts
from mcad.io import atomic_path, read_json, sha256_file, write_manifest

log = logging.getLogger("mcad.cache")
# 2: neighbours are other scenes (image_keys), not duplicates; 3: + h_img/h_txt (loss.fused=candidates).
# A format-2 cache still serves everything but loss.fused=candidates, which asks for a rebuild.
FORMAT = "mcad-teacher-cache/3"


def caption_table(image_captions: list[list[int]]) -> np.ndarray:
    width = max(len(c) for c in image_captions)
    out = np.full((len(image_captions), width), -1, dtype=np.int64)
    for i, c in enumerate(image_captions):
        out[i, :len(c)] = c
    return out


def candidate_features(h_pairs: torch.Tensor, dest: np.ndarray, m_i2t: torch.Tensor, m_t2i: torch.Tensor,
                       tau_f: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A shard's h_img [n, W] and h_txt [n, C, W] from its fused pairs (`dest` rows as build_cache
    writes them) and its ITM logits (NaN where a caption slot is padding)."""
    from mcad.distill.losses import candidate_mix

    (n, k, C), W = m_i2t.shape, h_pairs.shape[1]
    w = dest[:, 0] == 0
    h_i2t = torch.zeros(n, k, C, W)
    h_i2t[dest[w, 1], dest[w, 2], dest[w, 3]] = h_pairs[torch.as_tensor(w)]
    h_t2i = torch.zeros(n, C, k, W)
    h_t2i[:, :, 0] = h_i2t[:, 0]  # r = 0: image i itself with its own caption c
    h_t2i[dest[~w, 1], dest[~w, 2], dest[~w, 3]] = h_pairs[torch.as_tensor(~w)]
    h_img = candidate_mix(h_i2t.view(n, k * C, W), m_i2t.reshape(n, k * C), ~m_i2t.isnan().view(n, k * C), tau_f)
    return h_img, candidate_mix(h_t2i, m_t2i, ~m_t2i.isnan(), tau_f)


PARTIAL = "partial.json"  # the shards written so far, and what they were made from (resume after a kill)


def build_key(config: dict | None, shard_images: int, tau_f: float, k: int, fused: bool = True) -> str:
    """What a cache's shards depend on: teachers, data, candidate lists' size, shard size, τ_F,
    whether they hold F's fused features, format."""
    import hashlib
    import json

    what = {"config": config or {}, "shard_images": int(shard_images), "tau_f": float(tau_f), "k": int(k),
            "format": FORMAT}
    if not fused:  # (a cache with fused features keys as it did before the switch)
        what["fused"] = False
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def _resumable(out: Path, key: str) -> list[dict]:
    """Shards a killed build of the same inputs finished (each checked against its sha256)."""
    f = out / PARTIAL
    if not f.exists():
        return []
    try:
        partial = read_json(f)
    except (OSError, ValueError):
        return []
    if partial.get("key") != key:
        log.info("cache: %s is of other inputs; building from the start", f)
        return []
    done = []
    for sh in partial.get("shards", []):
        if not (out / sh["file"]).exists() or sha256_file(out / sh["file"]) != sh["sha256"]:
            break
        done.append(sh)
    return done


@torch.no_grad()
def build_cache(dual, fusion, pixels, ids: np.ndarray, image_captions: list[list[int]],
                lists: np.ndarray, out: Path, shard_images: int = 2048, pair_batch: int = 1024,
                config: dict | None = None, progress: bool = True, tau_f: float = 1.0, fusion_ids: np.ndarray | None = None,
                on_shard=None, image_emb: torch.Tensor | None = None, fused: bool = True) -> Path:
    """Write the cache shard by shard. `pixels`: mcad.data.stream.Images at the dual teacher's view
    (or a uint8 array); each teacher reads them at its own view. `fusion_ids`: the captions as the
    fusion teacher reads them, where its tokenizer is not the dual's (BLIP's BERT ids).

    Streams: each shard is written (atomically) as it fills and recorded in partial.json with its
    sha256 and a key of everything it depends on; a build killed half-way is resumed from the shards
    it finished when the same inputs are given again. The manifest comes last, and the previous
    build's manifest goes first (so no manifest ever points at half-rewritten shards).
    `on_shard(i)` is called after shard i is recorded (progress hooks, tests); `image_emb`: the dual
    teacher's image embeddings where the caller has them already (the neighbours were found with them).
    `fused=False` leaves F's fused features out (h, h_img, h_txt: only λ > 0 reads them); the manifest
    says so (`fused_features`), and a run that needs them refuses the cache (TeacherCache.check_fused).

    Under torchrun every process calls it: each encodes its whole batches of images and captions with
    D (gathered), and the shards after the resumed ones are dealt round-robin, one a process per round,
    each written by the process that computed it; rank 0 alone records each round in partial.json and
    writes the manifest. A shard's work is the one-process build's, so its file is the same bytes."""
    from mcad.data.stream import as_images
    from mcad.preprocess import view_of

    dual.eval()
    fusion.eval()
    main = distributed.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    images = as_images(pixels)
    caps = caption_table(image_captions)
    N, k = len(caps), lists.shape[1]
    key = build_key(config, shard_images, tau_f, k, fused)
    previous = _recorded_files(out) if main else set()
    done = distributed.broadcast_object(_resumable(out, key) if main else None)
    if main:
        (out / "manifest.json").unlink(missing_ok=True)
        if done:
            log.info("cache: resuming after %d of %d shards (%s)", len(done), -(-N // shard_images), out / PARTIAL)
        log.info("cache: dual-teacher embeddings of %d images and %d captions", N, len(ids))
    t0 = time.time()
    v_all = image_emb if image_emb is not None else encode_images_sharded(dual, images)
    t_all = encode_texts_sharded(dual, ids)
    f_images = images.as_view(view_of(fusion))
    f_ids = ids if fusion_ids is None else fusion_ids
    shards, n_pairs = list(done), sum(int(sh.get("pairs", 0)) for sh in done)
    bar = tqdm(total=N, initial=min(N, len(done) * shard_images), desc="teacher cache", unit="img",
               disable=not (progress and main))
    n_shards, rank, world = -(-N // shard_images), distributed.rank(), distributed.world_size()
    wrote = 0
    for first in range(len(done), n_shards, world):  # a round: shard first + r to process r
        i = first + rank
        mine = None
        if i < n_shards:
            s, e = i * shard_images, min(N, (i + 1) * shard_images)
            tensors, pairs = shard_tensors(fusion, f_images, f_ids, caps, lists, s, e, v_all, t_all, tau_f,
                                           pair_batch, fused)
            mine = _write_shard(out, f"shard-{i:05d}.safetensors", tensors, s, e, pairs)
            wrote += 1
        new = [sh for sh in distributed.all_gather_objects(mine) if sh is not None]
        shards += new
        n_pairs += sum(sh["pairs"] for sh in new)
        if main:
            _record_round(out, key, shards, new, bar, n_pairs, on_shard)
    bar.close()
    if world > 1:
        log.info("cache: process %d of %d wrote %d of %d shards", rank, world, wrote, n_shards)
    if main:
        _finish(out, config, shards, previous, N, ids, k, n_pairs, time.time() - t0, fused, tau_f, key)
    distributed.barrier()
    return out


def _write_shard(out: Path, name: str, tensors: dict, s: int, e: int, pairs: int) -> dict:
    """One shard's file (atomically) and its record."""
    from safetensors.torch import save_file

    with atomic_path(out / name) as tmp:
        save_file(tensors, str(tmp))
    return {"file": name, "images": [s, e], "bytes": (out / name).stat().st_size,
            "sha256": sha256_file(out / name), "pairs": int(pairs)}


def _record_round(out: Path, key: str, shards: list[dict], new: list[dict], bar, n_pairs: int, on_shard) -> None:
    """partial.json after a round's shards are written; the progress bar and hook."""
    from mcad.io import write_json

    write_json(out / PARTIAL, {"key": key, "shards": shards})
    for n, sh in enumerate(new):
        bar.update(sh["images"][1] - sh["images"][0])
        bar.set_postfix(pairs=n_pairs)
        if on_shard is not None:
            on_shard(len(shards) - len(new) + n)


def _finish(out: Path, config, shards, previous, N, ids, k, n_pairs, secs, fused, tau_f, key) -> None:
    """The manifest, then partial.json and the shards of a bigger earlier build go."""
    log.info("cache: %d images, %d fusion pairs, %.1f s", N, n_pairs, secs)
    write_manifest(out / "manifest.json", kind="teacher-cache", config=config or {},
                   files=[out / sh["file"] for sh in shards], format=FORMAT,
                   shards=[{k2: v for k2, v in sh.items() if k2 != "pairs"} for sh in shards], images=N,
                   captions=int(len(ids)), list_size=int(k), fusion_pairs=int(n_pairs), seconds=round(secs, 1),
                   fused_features=bool(fused), fused_tau_f=float(tau_f) if fused else None, build_key=key)
    (out / PARTIAL).unlink(missing_ok=True)
    for stale in sorted(previous - {sh["file"] for sh in shards}):  # shards of a bigger earlier build
        (out / stale).unlink(missing_ok=True)


@torch.no_grad()
def encode_images_sharded(model, images) -> torch.Tensor:
    """mcad.evaluate.encode_images of `images`, batch for batch: under torchrun each process encodes
    its whole batches (distributed.chunk_range) and every process gets all rows."""
    if distributed.world_size() == 1:
        return encode_images(model, images)
    from mcad.accelerator import autocast, model_device
    from mcad.data.stream import as_images, image_batch
    from mcad.preprocess import model_input, view_of

    model.eval()
    dev, bs = model_device(model), image_batch(int(model.image_size))
    view = as_images(images).as_view(view_of(model))
    s, e = distributed.chunk_range(len(view), bs)
    local = torch.zeros(0, int(model.embed_dim))
    if e > s:
        with autocast(dev):
            local = torch.cat([model.encode_image(model_input(model, px).to(dev)).float().cpu()
                               for px in view.batches(np.arange(j, min(e, j + bs)) for j in range(s, e, bs))])
    return distributed.all_gather_rows(local)


@torch.no_grad()
def encode_texts_sharded(model, ids: np.ndarray, batch_size: int = 1024) -> torch.Tensor:
    """mcad.evaluate.encode_texts of `ids`, batch for batch, each process encoding its whole batches."""
    if distributed.world_size() == 1:
        return encode_texts(model, ids, batch_size)
    s, e = distributed.chunk_range(len(ids), batch_size)
    local = encode_texts(model, ids[s:e], batch_size) if e > s else torch.zeros(0, int(model.embed_dim))
    return distributed.all_gather_rows(local)


def _recorded_files(out: Path) -> set[str]:
    """The shard files this tool recorded in the folder (manifest and partial.json): the only ones it deletes."""
    names: set[str] = set()
    for f in (out / "manifest.json", out / PARTIAL):
        try:
            names |= {sh["file"] for sh in read_json(f).get("shards", []) if isinstance(sh, dict) and "file" in sh}
        except (OSError, ValueError, AttributeError):
            continue
    return {n for n in names if Path(n).name == n}


def shard_pairs(caps: np.ndarray, lists: np.ndarray, s: int, e: int):
    """The fusion pairs of images s..e-1: (image, caption, destination) rows, where destination is
    (0, local image, r, c) for image i with caption c of its candidate L_i[r], and (1, local image,
    c, r) for candidate image L_i[r] (r >= 1) with caption c of image i."""
    C, k = caps.shape[1], lists.shape[1]
    ii, cc, dest = [], [], []
    for loc, i in enumerate(range(s, e)):
        for r in range(k):
            j = int(lists[i, r])
            for c in range(C):
                if caps[j, c] >= 0:
                    ii.append(i); cc.append(int(caps[j, c])); dest.append((0, loc, r, c))
        for c in range(C):
            if caps[i, c] < 0:
                continue
            for r in range(1, k):  # r = 0 is in m_i2t[., 0, .]
                ii.append(int(lists[i, r])); cc.append(int(caps[i, c])); dest.append((1, loc, c, r))
    return np.array(ii, dtype=np.int64), np.array(cc, dtype=np.int64), np.array(dest, dtype=np.int64)


@torch.no_grad()
def fuse_pairs(fusion, f_images, f_ids: np.ndarray, ii: np.ndarray, cc: np.ndarray, pair_batch: int = 1024,
               with_h: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """F's (h [P, W] or None without `with_h`, m [P]) of the pairs (image ii[p], text cc[p]): the
    images' tokens once per image (F's view of `f_images`), the texts' once per text (`f_ids`: as F
    reads them), the pairs fused in batches of texts of similar length."""
    from mcad.data.stream import image_batch
    from mcad.preprocess import model_input

    img_need, img_pos = np.unique(ii, return_inverse=True)
    cap_need, cap_pos = np.unique(cc, return_inverse=True)
    b = image_batch(int(fusion.image_size))
    chunks = [img_need[j:j + b] for j in range(0, len(img_need), b)]
    img_tok = torch.cat([fusion.image_tokens(model_input(fusion, px)) for px in f_images.batches(chunks)])
    # a pair batch gathers one image's tokens per pair: at most ~128 MB of them (1024 pairs of the
    # embedded teachers' 64 x 128 tokens; 72 of BLIP-base's 577 x 768)
    pair_batch = max(16, min(pair_batch, (128 << 20) // (img_tok[0].numel() * img_tok.element_size())))
    ids_need = torch.as_tensor(f_ids[cap_need])
    txt_tok = torch.cat([fusion.text_tokens(ids_need[j:j + 1024]) for j in range(0, len(ids_need), 1024)])
    # chunks of captions of similar length: the fusion model drops a chunk's common padding
    lengths = (np.asarray(f_ids[cap_need]) != fusion.pad_id).sum(1)
    ii_t, cc_t = torch.as_tensor(img_pos), torch.as_tensor(cap_pos)
    order = torch.as_tensor(np.argsort(lengths[cap_pos], kind="stable"))
    h_pairs = torch.empty(len(ii), fusion.width) if with_h else None
    m_pairs = torch.empty(len(ii))
    for p in range(0, len(ii), pair_batch):
        sel = order[p:p + pair_batch]
        h_sel, m_pairs[sel] = fusion.fuse(img_tok[ii_t[sel]], txt_tok[cc_t[sel]], ids_need[cc_t[sel]])
        if with_h:
            h_pairs[sel] = h_sel
    return h_pairs, m_pairs


@torch.no_grad()
def shard_tensors(fusion, f_images, f_ids, caps, lists, s, e, v_all, t_all, tau_f, pair_batch, fused=True):
    """One shard's tensors (see distill.cache's module doc) and its number of fusion pairs; without
    `fused`, F's logits only (no h, h_img, h_txt)."""
    n, C, k = e - s, caps.shape[1], lists.shape[1]
    ii, cc, d = shard_pairs(caps, lists, s, e)
    h_pairs, m_pairs = fuse_pairs(fusion, f_images, f_ids, ii, cc, pair_batch, fused)
    m_i2t, m_t2i = torch.full((n, k, C), float("nan")), torch.full((n, C, k), float("nan"))
    w = d[:, 0] == 0
    m_i2t[d[w, 1], d[w, 2], d[w, 3]] = m_pairs[torch.as_tensor(w)]
    m_t2i[:, :, 0] = m_i2t[:, 0, :]
    m_t2i[d[~w, 1], d[~w, 2], d[~w, 3]] = m_pairs[torch.as_tensor(~w)]
    cs = torch.as_tensor(caps[s:e])
    t = torch.zeros(n, C, t_all.shape[1])
    t[cs >= 0] = t_all[cs[cs >= 0]]
    out = {"v": v_all[s:e].contiguous(), "t": t, "m_i2t": m_i2t, "m_t2i": m_t2i,
           "lists": torch.as_tensor(lists[s:e]).contiguous(), "captions": cs.contiguous()}
    if fused:
        h = torch.zeros(n, C, h_pairs.shape[1])
        self_rows = w & (d[:, 2] == 0)
        h[d[self_rows, 1], d[self_rows, 3]] = h_pairs[torch.as_tensor(self_rows)]
        out["h"] = h
        out["h_img"], out["h_txt"] = candidate_features(h_pairs, d, m_i2t, m_t2i, tau_f)
    return out, len(ii)
