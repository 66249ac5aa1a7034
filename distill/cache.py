"""`mcad cache`: run both teachers once over a training set; distillation then never runs one.

Candidates are fixed lists, the same online and cached: image i's list L_i is i itself followed
by its `neighbours` nearest images under the dual teacher that have another description than i
(images of the same synthetic scene are duplicates, not confusers; on real data every image has its
own key). The confuser batches are drawn from the same neighbours. In a batch, image a and caption b are candidates of each other when
b's image is in L_a (image -> text rows) or a's image is in L_b (text -> image rows).

Per image i the cache stores, for every caption slot c (captions of an image, padded with -1):
  v[i]              dual-teacher image embedding
  t[i, c]           dual-teacher caption embedding
  h[i, c]           fused feature of the matched pair (image i, its caption c)
  m_i2t[i, r, c]    ITM logit of image i with caption c of image L_i[r]
  m_t2i[i, c, r]    ITM logit of image L_i[r] with caption c of image i
  h_img[i]          F's fused features of image i with every caption of every image of L_i,
                    weighted by softmax(m_i2t[i] / tau_f) (loss.fused=candidates)
  h_txt[i, c]       the same for caption c of image i over the images of L_i (softmax of m_t2i[i, c])
in safetensors shards of `shard_images` images, with manifest.json (config, teacher and data
hashes, shard hashes, the tau_f of h_img/h_txt). `TeacherCache.batch` and `online_batch` (with
`online_candidate_features`) return the same `TeacherOutputs`.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mcad.config import load_command_config
from mcad.evaluate import encode_images, encode_texts, image_keys
from mcad.io import atomic_path, read_json, sha256_file, write_manifest
from mcad.distill.sampling import nearest_neighbours

log = logging.getLogger("mcad.cache")
# 2: neighbours are other scenes (image_keys), not duplicates; 3: + h_img/h_txt (loss.fused=candidates).
# A format-2 cache still serves everything but loss.fused=candidates, which asks for a rebuild.
FORMAT = "mcad-teacher-cache/3"
READABLE = (FORMAT, "mcad-teacher-cache/2")
TEACHER_FILES = ("dual.safetensors", "fusion.safetensors", "tokenizer.json")


def rebuild_hint(root: Path, teachers: str | Path | None = None, data: str | None = None) -> str:
    # `make cache` is keyed by runs/teachers/metrics.json's time: it does nothing while an older
    # cache's manifest is newer, so the command given is the one that always rebuilds
    data_args = data if data and "=" in str(data) else f"data={data or '<data>'}"  # a spec: data.format=...
    return (f"rebuild it with `mcad cache teachers={teachers or '<teachers>'} {data_args} "
            f"cache={root}` (or `rm -r {root}` then `make cache`)")


@dataclass
class TeacherOutputs:
    """What the teachers say about one batch of B images with one caption each (no gradient).
    mask[a, b]: caption b is a candidate of image a (b's image in L_a); as [texts, images] it is
    also the text -> image candidate mask (a's image in L_b, read with rows = captions)."""
    v: torch.Tensor        # [B, D]
    t: torch.Tensor        # [B, D]
    h: torch.Tensor        # [B, W] fused feature of each matched pair
    mask: torch.Tensor     # [B, B] bool
    m_i2t: torch.Tensor    # [B images, B texts], valid where mask
    m_t2i: torch.Tensor    # [B texts, B images], valid where mask
    # loss.fused=candidates: F's fused features over the candidate lists (see the module doc),
    # fixed per image and per caption; empty where not asked for
    h_img: torch.Tensor = field(default_factory=lambda: torch.zeros(0))   # [B, W] image a
    h_txt: torch.Tensor = field(default_factory=lambda: torch.zeros(0))   # [B, W] caption b

    @property
    def mask_i2t(self) -> torch.Tensor:
        return self.mask

    @property
    def mask_t2i(self) -> torch.Tensor:
        return self.mask


def candidate_lists(neighbours: np.ndarray) -> np.ndarray:
    """L_i = [i, its nearest images...]."""
    return np.concatenate([np.arange(len(neighbours))[:, None], neighbours], axis=1).astype(np.int64)


def dual_neighbours(dual, pixels: np.ndarray, k: int, keys: np.ndarray | None = None) -> np.ndarray:
    """The `k` nearest training images of each under the dual teacher (batches and candidates),
    among those with another description than its own (`keys`, see mcad.evaluate.image_keys)."""
    return nearest_neighbours(encode_images(dual, pixels), k, keys=keys)


def batch_positions(idx: np.ndarray, lists: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """mask[a, b] = idx[b] in L_{idx[a]}; pos[a, b] = its position r in that list (0 where not)."""
    L = torch.as_tensor(lists[idx])                                # [B, k]
    eq = L[:, :, None] == torch.as_tensor(idx)[None, None, :]      # [B, k, B]
    return eq.any(1), eq.to(torch.int8).argmax(1)


def caption_slots(cap_table: np.ndarray, idx: np.ndarray, cap: np.ndarray) -> np.ndarray:
    """Position of each chosen caption among its image's captions."""
    hit = cap_table[idx] == cap[:, None]
    if not hit.any(1).all():
        raise ValueError("a chosen caption is not one of its image's captions")
    return hit.argmax(1)


def caption_table(image_captions: list[list[int]]) -> np.ndarray:
    width = max(len(c) for c in image_captions)
    out = np.full((len(image_captions), width), -1, dtype=np.int64)
    for i, c in enumerate(image_captions):
        out[i, :len(c)] = c
    return out


@torch.no_grad()
def online_batch(dual, fusion, px: torch.Tensor, ids_b: torch.Tensor, idx: np.ndarray,
                 lists: np.ndarray, with_fusion: bool = True, f_px: torch.Tensor | None = None,
                 f_ids: torch.Tensor | None = None) -> TeacherOutputs:
    """Run the teachers on one batch (px normalised for the dual teacher). `with_fusion=False`
    skips the fusion teacher (a run that never reads F: its h and m come back as zeros). `f_px`,
    `f_ids`: the fusion teacher's own view of the batch where it differs from the dual's (a BLIP
    after a CLIP: other size and mean/std, BERT ids; mcad.teacher_spec)."""
    v, t = dual.encode_image(px), dual.encode_text(ids_b)
    mask, _ = batch_positions(idx, lists)
    if not with_fusion:
        B = len(idx)
        return TeacherOutputs(v, t, torch.zeros(B, fusion.width), mask, torch.zeros(B, B), torch.zeros(B, B))
    pairs = (mask | mask.T).nonzero()  # image a, caption b: both directions' candidates at once
    f_px, f_ids = (px if f_px is None else f_px), (ids_b if f_ids is None else f_ids)
    img_tok, txt_tok = fusion.image_tokens(f_px), fusion.text_tokens(f_ids)
    h_all, m_all = fusion.score_pairs(img_tok, txt_tok, f_ids, pairs[:, 0], pairs[:, 1])
    B = len(idx)
    g = torch.zeros(B, B)
    g[pairs[:, 0], pairs[:, 1]] = m_all
    h = torch.zeros(B, h_all.shape[1])
    diag = pairs[:, 0] == pairs[:, 1]
    h[pairs[diag, 0]] = h_all[diag]
    return TeacherOutputs(v, t, h, mask, g * mask, g.T * mask)


@torch.no_grad()
def online_candidate_features(fusion, image_input, f_ids: np.ndarray, cap_table: np.ndarray, lists: np.ndarray,
                              idx: np.ndarray, cap: np.ndarray, tau_f: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h_img [B, W], h_txt [B, W] of a batch as the cache holds them, by running F: image idx[a]
    with every caption of every image of its list L_{idx[a]}, and the batch's caption of image
    idx[a] (`cap[a]`) with every image of that list, each weighted by softmax(m/τ_F) (candidate_mix).
    `image_input(indices)`: F's input pixels of those training images; `f_ids`: all captions as F
    reads them; `cap_table`: caption ids per image (caption_table)."""
    from mcad.distill.losses import candidate_mix

    B, k, C = len(idx), lists.shape[1], cap_table.shape[1]
    L = lists[idx]                                      # [B, k] candidate images
    caps = cap_table[L]                                 # [B, k, C] their captions (-1: padding)
    imgs = np.unique(np.concatenate([idx, L.ravel()]))
    capn = np.unique(np.concatenate([caps[caps >= 0], cap]))
    img_pos = np.searchsorted(imgs, np.arange(imgs.max() + 1))
    cap_pos = np.searchsorted(capn, np.arange(capn.max() + 1))
    img_tok = fusion.image_tokens(image_input(imgs))
    ids_need = torch.as_tensor(f_ids[capn])
    txt_tok = fusion.text_tokens(ids_need)
    a1, r1, c1 = np.nonzero(caps >= 0)                  # image idx[a] x caption c of L[a, r]
    a2, r2 = (x.ravel() for x in np.indices((B, k)))    # image L[a, r] x caption cap[a]
    ii = np.concatenate([img_pos[idx[a1]], img_pos[L[a2, r2]]])
    cc = np.concatenate([cap_pos[caps[a1, r1, c1]], cap_pos[cap[a2]]])
    h, m = fusion.score_pairs(img_tok, txt_tok, ids_need, torch.as_tensor(ii), torch.as_tensor(cc))
    n1, W = len(a1), h.shape[1]
    h_i2t, m_i2t = torch.zeros(B, k, C, W), torch.zeros(B, k, C)
    h_i2t[a1, r1, c1], m_i2t[a1, r1, c1] = h[:n1], m[:n1]
    h_img = candidate_mix(h_i2t.view(B, k * C, W), m_i2t.view(B, k * C), torch.as_tensor(caps >= 0).view(B, k * C), tau_f)
    h_txt = candidate_mix(h[n1:].view(B, k, W), m[n1:].view(B, k), torch.ones(B, k, dtype=torch.bool), tau_f)
    return h_img, h_txt


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


class TeacherCache:
    """All shards in memory (a few hundred bytes per caption)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        mf = self.root / "manifest.json"
        if not mf.exists():
            raise FileNotFoundError(f"{mf}: no teacher cache here (run `mcad cache` or `make cache`)")
        self.manifest = read_json(mf)
        if self.manifest.get("format") not in READABLE:
            raise ValueError(f"{mf}: format {self.manifest.get('format')!r}, expected {FORMAT!r}: rebuild it "
                             f"(`rm -r {self.root}` then `make cache`, or `mcad cache`)")
        from safetensors.torch import load_file

        parts: dict[str, list[torch.Tensor]] = {}
        for sh in self.manifest["shards"]:
            path = self.root / sh["file"]
            if not path.exists():
                raise FileNotFoundError(f"{path}: teacher cache shard missing")
            if sh.get("sha256") and sha256_file(path) != sh["sha256"]:
                raise ValueError(f"{path}: shard content differs from the sha256 in {mf} (damaged); "
                                 + rebuild_hint(self.root, data=(self.manifest.get("config") or {}).get("data")))
            for k, v in load_file(str(path)).items():
                parts.setdefault(k, []).append(v)
        d = {k: torch.cat(v) for k, v in parts.items()}
        self.v, self.t, self.h = d["v"], d["t"], d["h"]
        self.m_i2t, self.m_t2i = d["m_i2t"], d["m_t2i"]
        self.h_img, self.h_txt = d.get("h_img"), d.get("h_txt")  # None in a format-2 cache
        self.lists = d["lists"].numpy()
        self.captions = d["captions"].numpy()

    @property
    def neighbours(self) -> np.ndarray:
        return self.lists[:, 1:]

    def check(self, n_images: int, image_captions: list[list[int]], teachers: str | Path | None = None,
              data: str | None = None) -> None:
        """Refuse a cache of another data set (sizes, caption table; with `data`, the `data_key` of
        the images and captions) or, with `teachers`, of other teacher files than those there now."""
        cfg = self.manifest.get("config") or {}
        hint = rebuild_hint(self.root, None if isinstance(teachers, dict) else teachers, cfg.get("data"))
        if len(self.lists) != n_images or not np.array_equal(self.captions, caption_table(image_captions)):
            raise ValueError(f"{self.root}: cache was built for another data set ({len(self.lists)} images, "
                             f"this one has {n_images}): {hint}")
        if data is not None:
            if cfg.get("data_key") is None:  # caches written before the key was recorded
                log.warning("%s: cache records no data hash (built by an older mcad); rebuild it to have "
                            "it checked", self.root)
            elif cfg["data_key"] != data:
                raise ValueError(f"{self.root}: cache was built from other images or captions than "
                                 f"{cfg.get('data', 'the data')} holds now: {hint}")
        if teachers is not None:
            self.check_teachers(teachers if isinstance(teachers, dict) else Path(teachers), hint)

    def check_teachers(self, teachers: Path | dict, hint: str) -> None:
        """The teachers' sha256 recorded at build time against the files there now (`teachers`: their
        folder, or the hashes of the teachers a recipe names, mcad.teacher_spec.hashes)."""
        recorded = (self.manifest.get("config") or {}).get("teachers") or {}
        if isinstance(teachers, dict):
            changed = sorted(f for f in set(recorded) | set(teachers) if recorded.get(f) != teachers.get(f))
            if changed:
                raise ValueError(f"{self.root}: cache was built from other teachers ({', '.join(changed[:4])}"
                                 f"{' ...' if len(changed) > 4 else ''} changed since): {hint}")
            return
        changed = [f for f in TEACHER_FILES if not (teachers / f).exists() or recorded.get(f) != sha256_file(teachers / f)]
        if changed:
            raise ValueError(f"{self.root}: cache was built from other teachers ({', '.join(changed)} in "
                             f"{teachers} changed since): {hint}")

    def check_fused(self, tau_f: float) -> None:
        """loss.fused=candidates reads h_img/h_txt, stored at the τ_F the cache was built with:
        refuse a cache without them (format 2) or of another τ_F."""
        hint = rebuild_hint(self.root, data=(self.manifest.get("config") or {}).get("data"))
        if self.h_img is None or self.h_txt is None:
            raise ValueError(f"{self.root}: format {self.manifest.get('format')!r} holds no fused features over the "
                             f"candidates (loss.fused=candidates needs {FORMAT!r}): {hint}")
        built = self.manifest.get("fused_tau_f")
        if built is None or abs(float(built) - tau_f) > 1e-9:
            raise ValueError(f"{self.root}: fused features weighted at loss.tau_f={built}, the config has "
                             f"loss.tau_f={tau_f}: {hint}")

    def batch(self, idx: np.ndarray, cap: np.ndarray) -> TeacherOutputs:
        slot = torch.as_tensor(caption_slots(self.captions, idx, cap))
        ti = torch.as_tensor(idx)
        mask, pos = batch_positions(idx, self.lists)
        pos = pos.long()
        B = len(idx)
        a = torch.arange(B)[:, None].expand(B, B)
        b = torch.arange(B)[None, :].expand(B, B)
        m_i2t = self.m_i2t[ti[a], pos, slot[b]] * mask      # image a, caption b of image idx[b] = L_a[pos]
        m_t2i = self.m_t2i[ti[a], slot[a], pos] * mask      # caption a, image idx[b] = L_{idx[a]}[pos]
        fused = {} if self.h_img is None else {"h_img": self.h_img[ti], "h_txt": self.h_txt[ti, slot]}
        return TeacherOutputs(self.v[ti], self.t[ti, slot], self.h[ti, slot], mask,
                              m_i2t.nan_to_num(0.0), m_t2i.nan_to_num(0.0), **fused)


PARTIAL = "partial.json"  # the shards written so far, and what they were made from (resume after a kill)


def build_key(config: dict | None, shard_images: int, tau_f: float, k: int) -> str:
    """What a cache's shards depend on: teachers, data, candidate lists' size, shard size, τ_F, format."""
    import hashlib
    import json

    what = {"config": config or {}, "shard_images": int(shard_images), "tau_f": float(tau_f), "k": int(k),
            "format": FORMAT}
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
                on_shard=None, image_emb: torch.Tensor | None = None) -> Path:
    """Write the cache shard by shard. `pixels`: mcad.data.stream.Images at the dual teacher's view
    (or a uint8 array); each teacher reads them at its own view. `fusion_ids`: the captions as the
    fusion teacher reads them, where its tokenizer is not the dual's (BLIP's BERT ids).

    Streams: each shard is written (atomically) as it fills and recorded in partial.json with its
    sha256 and a key of everything it depends on; a build killed half-way is resumed from the shards
    it finished when the same inputs are given again. The manifest comes last, and the previous
    build's manifest goes first (so no manifest ever points at half-rewritten shards).
    `on_shard(i)` is called after shard i is recorded (progress hooks, tests); `image_emb`: the dual
    teacher's image embeddings where the caller has them already (the neighbours were found with them)."""
    from mcad.data.stream import as_images
    from mcad.io import write_json
    from mcad.preprocess import view_of

    dual.eval()
    fusion.eval()
    out.mkdir(parents=True, exist_ok=True)
    images = as_images(pixels)
    caps = caption_table(image_captions)
    N, k = len(caps), lists.shape[1]
    key = build_key(config, shard_images, tau_f, k)
    previous = _recorded_files(out)
    done = _resumable(out, key)
    (out / "manifest.json").unlink(missing_ok=True)
    if done:
        log.info("cache: resuming after %d of %d shards (%s)", len(done), -(-N // shard_images), out / PARTIAL)
    t0 = time.time()
    log.info("cache: dual-teacher embeddings of %d images and %d captions", N, len(ids))
    v_all = image_emb if image_emb is not None else encode_images(dual, images)
    t_all = encode_texts(dual, ids)
    f_images = images.as_view(view_of(fusion))
    f_ids = ids if fusion_ids is None else fusion_ids
    shards, n_pairs = list(done), sum(int(sh.get("pairs", 0)) for sh in done)
    bar = tqdm(total=N, initial=min(N, len(done) * shard_images), desc="teacher cache", unit="img",
               disable=not progress)
    for s in range(len(done) * shard_images, N, shard_images):
        e = min(N, s + shard_images)
        tensors, pairs = shard_tensors(fusion, f_images, f_ids, caps, lists, s, e, v_all, t_all, tau_f, pair_batch)
        name = f"shard-{len(shards):05d}.safetensors"
        from safetensors.torch import save_file

        with atomic_path(out / name) as tmp:
            save_file(tensors, str(tmp))
        n_pairs += pairs
        shards.append({"file": name, "images": [s, e], "bytes": (out / name).stat().st_size,
                       "sha256": sha256_file(out / name), "pairs": int(pairs)})
        write_json(out / PARTIAL, {"key": key, "shards": shards})
        bar.update(e - s)
        bar.set_postfix(pairs=n_pairs)
        if on_shard is not None:
            on_shard(len(shards) - 1)
    bar.close()
    secs = time.time() - t0
    log.info("cache: %d images, %d fusion pairs, %.1f s", N, n_pairs, secs)
    write_manifest(out / "manifest.json", kind="teacher-cache", config=config or {},
                   files=[out / sh["file"] for sh in shards], format=FORMAT,
                   shards=[{k2: v for k2, v in sh.items() if k2 != "pairs"} for sh in shards], images=N,
                   captions=int(len(ids)), list_size=int(k), fusion_pairs=int(n_pairs), seconds=round(secs, 1),
                   fused_tau_f=float(tau_f), build_key=key)
    (out / PARTIAL).unlink(missing_ok=True)
    for stale in sorted(previous - {sh["file"] for sh in shards}):  # shards of a bigger earlier build
        (out / stale).unlink(missing_ok=True)
    return out


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
def shard_tensors(fusion, f_images, f_ids, caps, lists, s, e, v_all, t_all, tau_f, pair_batch):
    """One shard's tensors (see the module doc) and its number of fusion pairs."""
    from mcad.preprocess import model_input

    n, C, k = e - s, caps.shape[1], lists.shape[1]
    ii, cc, d = shard_pairs(caps, lists, s, e)
    img_need, img_pos = np.unique(ii, return_inverse=True)
    cap_need, cap_pos = np.unique(cc, return_inverse=True)
    from mcad.data.stream import image_batch

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
    h_pairs, m_pairs = torch.empty(len(ii), fusion.width), torch.empty(len(ii))
    for p in range(0, len(ii), pair_batch):
        sel = order[p:p + pair_batch]
        h_pairs[sel], m_pairs[sel] = fusion.fuse(img_tok[ii_t[sel]], txt_tok[cc_t[sel]], ids_need[cc_t[sel]])
    m_i2t, m_t2i = torch.full((n, k, C), float("nan")), torch.full((n, C, k), float("nan"))
    h = torch.zeros(n, C, h_pairs.shape[1])
    w = d[:, 0] == 0
    m_i2t[d[w, 1], d[w, 2], d[w, 3]] = m_pairs[torch.as_tensor(w)]
    self_rows = w & (d[:, 2] == 0)
    h[d[self_rows, 1], d[self_rows, 3]] = h_pairs[torch.as_tensor(self_rows)]
    m_t2i[:, :, 0] = m_i2t[:, 0, :]
    m_t2i[d[~w, 1], d[~w, 2], d[~w, 3]] = m_pairs[torch.as_tensor(~w)]
    h_img, h_txt = candidate_features(h_pairs, d, m_i2t, m_t2i, tau_f)
    cs = torch.as_tensor(caps[s:e])
    t = torch.zeros(n, C, t_all.shape[1])
    t[cs >= 0] = t_all[cs[cs >= 0]]
    return {"v": v_all[s:e].contiguous(), "t": t, "h": h, "m_i2t": m_i2t, "m_t2i": m_t2i, "h_img": h_img,
            "h_txt": h_txt, "lists": torch.as_tensor(lists[s:e]).contiguous(), "captions": cs.contiguous()}, len(ii)


def main(argv: list[str]) -> int:
    from mcad import teacher_spec
    from mcad.accelerator import resolve_device
    from mcad.checks import CACHE, require_counts
    from mcad.data import spec as data_spec
    from mcad.preprocess import view_of
    from mcad.distill.teachers import add_file_log

    # the student recipe (data, teachers, neighbours, cache, device) + the shard size, which only the cache reads
    cfg = load_command_config(argv, "student", extra={"cache_shard_images": 2048}, shorthands=teacher_spec.shorthands())
    require_counts(cfg, CACHE)
    torch.set_num_threads(int(cfg.get("threads", 2)))
    data, device = data_spec.parse(cfg["data"]), resolve_device(cfg.get("device"))
    out = teacher_spec.cache_dir(cfg)
    add_file_log(out / "cache.log")
    tset = teacher_spec.load_teachers(cfg, device)
    dual, fusion, tok = tset.dual, tset.fusion, tset.tokenizer
    pixels, corpus = data_spec.open_split(data, cfg.get("train_split", "train"), view_of(dual), cfg.get("workers"))
    ids = tok.encode_batch(corpus.captions)
    emb = encode_images(dual, pixels)
    lists = candidate_lists(nearest_neighbours(emb, int(cfg["neighbours"]), keys=image_keys(corpus)))
    src = {"teachers": tset.hashes, "data": data.describe(), "data_key": pixels.key(corpus.captions),
           "neighbours": int(cfg["neighbours"])}
    if not teacher_spec.is_default(cfg):
        src["teacher_specs"] = tset.describe()
    build_cache(dual, fusion, pixels, ids, corpus.image_captions(), lists, out, int(cfg.get("cache_shard_images", 2048)),
                config=src, tau_f=float(cfg["loss"]["tau_f"]), fusion_ids=tset.fusion_ids(corpus.captions),
                image_emb=emb)
    print(f"teacher cache: {out}")
    return 0


if __name__ == "__main__":  # python -m: what the `mcad` command runs, for callers below the CLI (benchmarks)
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
