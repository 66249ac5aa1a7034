"""`mcad cache`: run both teachers once over a training set; distillation then never runs one.

Candidates are fixed lists, the same online and cached: image i's list L_i is i itself followed
by its `neighbours` nearest images under the dual teacher that have another description than i
(images of the same synthetic scene are duplicates, not confusers; on real data every image has its
own key). The confuser batches are drawn from the same neighbours. In a batch, image a and caption b are candidates of each other when
b's image is in L_a (image -> text rows) or a's image is in L_b (text -> image rows).

Per image i the cache stores, for every caption slot c (captions of an image, padded with -1):
  v[i]              dual-teacher image embedding
  t[i, c]           dual-teacher caption embedding
  m_i2t[i, r, c]    ITM logit of image i with caption c of image L_i[r]
  m_t2i[i, c, r]    ITM logit of image L_i[r] with caption c of image i
and, in a cache built for λ > 0 (the fused-feature path; `fused_features` in the manifest):
  h[i, c]           fused feature of the matched pair (image i, its caption c)
  h_img[i]          F's fused features of image i with every caption of every image of L_i,
                    weighted by softmax(m_i2t[i] / tau_f) (loss.fused=candidates)
  h_txt[i, c]       the same for caption c of image i over the images of L_i (softmax of m_t2i[i, c])
in safetensors shards of `shard_images` images, with manifest.json (config, teacher and data
hashes, shard hashes, the tau_f of h_img/h_txt). `TeacherCache.batch` and `online_batch` (with
`online_candidate_features`) return the same `TeacherOutputs`. Writing: `distill.cache_build`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mcad.config import load_command_config
# the writing side; PARTIAL and build_cache are also read from here (tests, `mcad cache`'s main)
from mcad.distill.cache_build import FORMAT, PARTIAL, build_cache, caption_table  # noqa: F401
from mcad.evaluate import encode_images, image_keys
from mcad.io import read_json, sha256_file
from mcad.distill.sampling import nearest_neighbours

log = logging.getLogger("mcad.cache")
READABLE = (FORMAT, "mcad-teacher-cache/2")
TEACHER_FILES = ("dual.safetensors", "fusion.safetensors", "tokenizer.json")


def rebuild_hint(root: Path, teachers: str | Path | None = None, data: str | None = None, extra: str = "") -> str:
    # `make cache` is keyed by runs/teachers/metrics.json's time: it does nothing while an older
    # cache's manifest is newer, so the command given is the one that always rebuilds
    data_args = data if data and "=" in str(data) else f"data={data or '<data>'}"  # a spec: data.format=...
    return (f"rebuild it with `mcad cache teachers={teachers or '<teachers>'} {data_args} "
            f"cache={root}{' ' + extra if extra else ''}` (or `rm -r {root}` then `make cache`)")


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
        self.v, self.t = d["v"], d["t"]
        self.m_i2t, self.m_t2i = d["m_i2t"], d["m_t2i"]
        self.h = d.get("h")  # None in a cache built without fused features (λ = 0)
        self.h_img, self.h_txt = d.get("h_img"), d.get("h_txt")  # None there and in a format-2 cache
        self.lists = d["lists"].numpy()
        self.captions = d["captions"].numpy()

    @property
    def neighbours(self) -> np.ndarray:
        return self.lists[:, 1:]

    def check(self, n_images: int, image_captions: list[list[int]], teachers: str | Path | None = None,
              data: str | None = None, teachers_arg: str | None = None) -> None:
        """Refuse a cache of another data set (sizes, caption table; with `data`, the `data_key` of
        the images and captions) or, with `teachers`, of other teacher files than those there now;
        `teachers_arg` is the teachers as the rebuild command names them (teachers= given as hashes)."""
        cfg = self.manifest.get("config") or {}
        hint = rebuild_hint(self.root, teachers_arg or (None if isinstance(teachers, dict) else teachers), cfg.get("data"))
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

    def check_fused(self, tau_f: float, fused: str = "candidates", lam: float = 1.0) -> None:
        """A run with λ > 0 reads F's fused features: refuse a cache built without them (λ = 0).
        loss.fused=candidates reads h_img/h_txt, stored at the τ_F the cache was built with: refuse
        a cache without them (format 2) or of another τ_F."""
        hint = rebuild_hint(self.root, data=(self.manifest.get("config") or {}).get("data"), extra=f"loss.lam={lam:g}")
        if self.h is None:
            raise ValueError(f"{self.root}: cache built without fused features (with loss.lam=0), this run has "
                             f"loss.lam={lam:g} and reads them: {hint}")
        if fused == "matched":
            return
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
        h = self.h[ti, slot] if self.h is not None else torch.zeros(B, 0)  # λ = 0 reads no fused feature
        return TeacherOutputs(self.v[ti], self.t[ti, slot], h, mask,
                              m_i2t.nan_to_num(0.0), m_t2i.nan_to_num(0.0), **fused)


def main(argv: list[str]) -> int:
    """`mcad cache`; under torchrun (NPROC=n) every process takes its share of the work (build_cache,
    distill.unpaired.compute_tables) and rank 0 alone holds the folder's lock and writes its log."""
    from mcad import distributed, teacher_spec
    from mcad.accelerator import resolve_device
    from mcad.checks import CACHE, require_counts
    from mcad.data import spec as data_spec
    from mcad.data.unpaired import parse_unpaired
    from mcad.logs import add_file_log
    from mcad.distill.unpaired import build_unpaired
    from mcad.preprocess import view_of
    from mcad.runs import run_folder_lock

    # the student recipe (data, teachers, neighbours, cache, device, unpaired) + the shard size, which only the cache reads
    cfg = load_command_config(argv, "student", extra={"cache_shard_images": 2048}, shorthands=teacher_spec.shorthands())
    require_counts(cfg, CACHE)
    un = parse_unpaired(cfg.get("unpaired"))
    data, device = data_spec.parse(cfg["data"]), resolve_device(cfg.get("device"))
    out = teacher_spec.cache_dir(cfg)
    with run_folder_lock(out, "cache"):  # one writer per cache folder (rank 0 under torchrun)
        _, world = distributed.init(device)
        device = distributed.local_device(device)
        torch.set_num_threads(max(1, int(cfg.get("threads", 2)) // world))
        if distributed.is_main():
            add_file_log(out / "cache.log")
        tset = teacher_spec.load_teachers(cfg, device)
        pixels = corpus = None
        if un.paired:
            pixels, corpus = build_paired(cfg, tset, data, out)
        if un.on:
            build_unpaired(cfg, un, tset, out / "unpaired", view_of(tset.dual), pixels,
                           corpus.captions if corpus is not None else None)
    if distributed.is_main():
        print(f"teacher cache: {out}")
    return 0


def build_paired(cfg: dict, tset, data, out: Path):
    """The cache over the recipe's training split; (its images, its corpus)."""
    from mcad import distributed, teacher_spec
    from mcad.distill.cache_build import encode_images_sharded
    from mcad.data import spec as data_spec
    from mcad.preprocess import view_of

    dual, fusion, tok = tset.dual, tset.fusion, tset.tokenizer
    pixels, corpus = data_spec.open_split(data, cfg.get("train_split", "train"), view_of(dual), cfg.get("workers"))
    ids = tok.encode_batch(corpus.captions)
    emb = encode_images_sharded(dual, pixels)  # every process gets all rows; rank 0 finds the neighbours
    lists = distributed.broadcast_object(candidate_lists(nearest_neighbours(emb, int(cfg["neighbours"]),
                                                                            keys=image_keys(corpus)))
                                         if distributed.is_main() else None)
    src = {"teachers": tset.hashes, "data": data.describe(), "data_key": pixels.key(corpus.captions),
           "neighbours": int(cfg["neighbours"])}
    if not teacher_spec.is_default(cfg):
        src["teacher_specs"] = tset.describe()
    # F's fused features only for a recipe with λ > 0 (any variant: the ablation's runs share one cache)
    build_cache(dual, fusion, pixels, ids, corpus.image_captions(), lists, out, int(cfg.get("cache_shard_images", 2048)),
                config=src, tau_f=float(cfg["loss"]["tau_f"]), fusion_ids=tset.fusion_ids(corpus.captions),
                image_emb=emb, fused=float(cfg["loss"]["lam"]) > 0)
    return pixels, corpus


if __name__ == "__main__":  # python -m: what the `mcad` command runs, for callers below the CLI (benchmarks)
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[1:]))
