"""Distillation on unpaired data: images without captions and texts without images (the sources:
mcad.data.unpaired; the method: docs/method.md, "Unpaired data").

No pair is labelled, so on these batches the student learns from its teachers alone. The teachers'
side, computed once (`compute_tables`) and kept by `mcad cache` under <cache>/unpaired/:
  v [n_img, D], t [n_txt, D]     D's embeddings of every unpaired image and text
  i2t [n_img, k], t2i [n_txt, k] candidates across the two sets: each image's k nearest texts under
                                 D, each text's k nearest images (exact inner product, faiss
                                 IndexFlatIP; ties by index)
  m_i2t, m_t2i                   F's matching logits over those candidate pairs: what MCAD's modified
                                 distribution reads (F's say within each row's candidates)
  h_img [n_img, W], h_txt        only with λ > 0: F's fused features of each image with its candidate
                                 texts (and each text with its candidate images), weighted by
                                 softmax(m / τ_F): the `candidates` form (no matched pair exists)
`UnpairedBatches` draws anchor images and anchor texts and adds their candidates, so every anchor's
candidates are in its batch; `batch_outputs` gives the batch's teacher outputs, with a candidate
mask per direction.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mcad import distributed
from mcad.io import atomic_path, read_json, sha256_file, write_manifest

log = logging.getLogger("mcad.cache")
FORMAT = "mcad-unpaired-cache/1"
TABLES = "tables.safetensors"


@dataclass
class UnpairedTables:
    """The teachers over the unpaired images and texts (see the module doc)."""
    v: torch.Tensor
    t: torch.Tensor
    i2t: np.ndarray
    t2i: np.ndarray
    m_i2t: torch.Tensor
    m_t2i: torch.Tensor
    h_img: torch.Tensor | None = None
    h_txt: torch.Tensor | None = None


@dataclass
class CrossOutputs:
    """The teachers' outputs for a batch of Bi unpaired images and Bt unpaired texts (no gradient).
    mask_i2t[a, b]: text b is one of image a's candidates; mask_t2i[b, a]: image a is one of text b's."""
    v: torch.Tensor          # [Bi, D]
    t: torch.Tensor          # [Bt, D]
    mask_i2t: torch.Tensor   # [Bi, Bt] bool
    m_i2t: torch.Tensor      # [Bi, Bt], valid where mask_i2t
    mask_t2i: torch.Tensor   # [Bt, Bi] bool
    m_t2i: torch.Tensor      # [Bt, Bi], valid where mask_t2i
    h_img: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [Bi, W] with λ > 0
    h_txt: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [Bt, W]


def cross_top_k(queries: torch.Tensor, keys: torch.Tensor, k: int, chunk: int = 8192) -> np.ndarray:
    """Each query row's k highest-scoring key rows by inner product [n_q, k], exact (faiss
    IndexFlatIP), ties in index order; `chunk` queries at a time (memory O(chunk * k))."""
    import faiss

    q = np.ascontiguousarray(torch.as_tensor(queries).float().cpu().numpy())
    x = np.ascontiguousarray(torch.as_tensor(keys).float().cpu().numpy())
    k = min(int(k), len(x))
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    want = min(len(x), 2 * k)  # room to order ties at the k-th place by index
    out = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), chunk):
        sims, ids = index.search(q[s:s + chunk], want)
        for r, (row_ids, row_sims) in enumerate(zip(ids, sims)):
            ok = row_ids >= 0
            order = np.lexsort((row_ids[ok], -row_sims[ok]))
            out[s + r] = row_ids[ok][order][:k]
    return out


def candidate_pairs(i2t: np.ndarray, t2i: np.ndarray, n_txt: int):
    """(images, texts) of the distinct candidate pairs, by image, and where each table entry is among
    them: i2t entries first (row-major), then t2i's."""
    n_img, n_tx = len(i2t), len(t2i)
    ii = np.concatenate([np.repeat(np.arange(n_img), i2t.shape[1]), t2i.ravel()])
    cc = np.concatenate([i2t.ravel(), np.repeat(np.arange(n_tx), t2i.shape[1])])
    codes, inverse = np.unique(ii * n_txt + cc, return_inverse=True)
    return codes // n_txt, codes % n_txt, inverse


@torch.no_grad()
def compute_tables(dual, fusion, images, ids: np.ndarray, f_ids: np.ndarray | None, k: int, tau_f: float = 1.0,
                   with_f: bool = True, fused: bool = False, chunk_images: int = 2048,
                   pair_batch: int = 1024) -> UnpairedTables:
    """The teachers over unpaired `images` (mcad.data.stream.Images at D's view) and texts (`ids`:
    D's token ids; `f_ids`: F's, None where F reads D's). `with_f=False` leaves F out (its logits come
    back as zeros: a dual-KD run never reads them); `fused` adds h_img/h_txt at `tau_f`. F runs over
    the candidate pairs a chunk of `chunk_images` images at a time.

    Under torchrun every process calls it and gets the whole tables: each encodes its whole batches
    of images and texts with D, rank 0 finds the candidates, and the chunks of F's pairs are dealt
    round-robin; each chunk's work is the one-process run's, so the tables are the same numbers."""
    from mcad.distill.cache_build import encode_images_sharded, encode_texts_sharded
    from mcad.distill.losses import candidate_mix

    v, t = encode_images_sharded(dual, images), encode_texts_sharded(dual, ids)
    i2t, t2i = distributed.broadcast_object((cross_top_k(v, t, k), cross_top_k(t, v, k)) if distributed.is_main()
                                            else None)
    n_img, n_txt = len(v), len(t)
    out = UnpairedTables(v, t, i2t, t2i, torch.zeros(i2t.shape), torch.zeros(t2i.shape))
    if not with_f:
        return out
    ui, uc, inverse = candidate_pairs(i2t, t2i, n_txt)
    log.info("unpaired: F over %d candidate pairs of %d images and %d texts", len(ui), n_img, n_txt)
    hs, ms = _fuse_chunks(fusion, images, ids if f_ids is None else f_ids, ui, uc, n_img, chunk_images, pair_batch,
                          fused)
    m = torch.cat(ms)[torch.as_tensor(inverse)]
    n1 = i2t.size
    out.m_i2t, out.m_t2i = m[:n1].view(i2t.shape), m[n1:].view(t2i.shape)
    if fused:
        h = torch.cat(hs)[torch.as_tensor(inverse)]
        W = h.shape[1]
        out.h_img = candidate_mix(h[:n1].view(*i2t.shape, W), out.m_i2t, torch.ones(i2t.shape, dtype=torch.bool), tau_f)
        out.h_txt = candidate_mix(h[n1:].view(*t2i.shape, W), out.m_t2i, torch.ones(t2i.shape, dtype=torch.bool), tau_f)
    return out


def _fuse_chunks(fusion, images, f_ids: np.ndarray, ui: np.ndarray, uc: np.ndarray, n_img: int, chunk_images: int,
                 pair_batch: int, fused: bool) -> tuple[list, list]:
    """F's (h or None, m) of the pairs (ui, uc) (sorted by image), one entry per chunk of images that has
    pairs, in order: a chunk's image tokens, then its pairs (cache_build.fuse_pairs). Under torchrun chunk
    j is computed by process j % world and every process gets every chunk."""
    from mcad.distill.cache_build import fuse_pairs
    from mcad.preprocess import view_of

    f_images = images.as_view(view_of(fusion))
    starts = np.searchsorted(ui, np.arange(0, n_img + chunk_images, chunk_images))
    spans = [(s, e) for s, e in zip(starts[:-1], starts[1:]) if e > s]
    rank, world = distributed.rank(), distributed.world_size()
    mine = {j: fuse_pairs(fusion, f_images, f_ids, ui[s:e], uc[s:e], pair_batch, fused)
            for j, (s, e) in enumerate(spans) if j % world == rank}
    done = {j: hm for part in distributed.all_gather_objects(mine) for j, hm in part.items()}
    return [done[j][0] for j in range(len(spans))], [done[j][1] for j in range(len(spans))]


def batch_outputs(tables: UnpairedTables, img: np.ndarray, txt: np.ndarray) -> CrossOutputs:
    """The teacher outputs of a batch of distinct unpaired images `img` and texts `txt`."""
    ti, tt = torch.as_tensor(img), torch.as_tensor(txt)
    eq_i = torch.as_tensor(tables.i2t[img])[:, :, None] == tt[None, None, :]      # [Bi, k, Bt]
    eq_t = torch.as_tensor(tables.t2i[txt])[:, :, None] == ti[None, None, :]      # [Bt, k, Bi]
    m_i2t = (eq_i * tables.m_i2t[ti][:, :, None]).sum(1)   # a text is at most once in a list
    m_t2i = (eq_t * tables.m_t2i[tt][:, :, None]).sum(1)
    fused = {} if tables.h_img is None else {"h_img": tables.h_img[ti], "h_txt": tables.h_txt[tt]}
    return CrossOutputs(tables.v[ti], tables.t[tt], eq_i.any(1), m_i2t, eq_t.any(1), m_t2i, **fused)


def _draw(n: int, per: int, seed: int, step: int, salt: int) -> np.ndarray:
    """`per` distinct indices of n for `step`: consecutive slices of a permutation per epoch."""
    per_epoch = max(1, n // per)
    epoch, j = divmod(step, per_epoch)
    return np.random.default_rng([seed, epoch, salt]).permutation(n)[j * per:(j + 1) * per]


class UnpairedBatches:
    """Batches of unpaired images and texts as pure functions of (seed, step): anchor images with
    their candidate texts, anchor texts with their candidate images (every anchor's candidates fall
    in the batch), topped up at random to `batch_size` of each (or all there are)."""

    def __init__(self, i2t: np.ndarray, t2i: np.ndarray, batch_size: int, seed: int):
        self.i2t, self.t2i, self.seed = i2t, t2i, int(seed)
        self.n_img, self.n_txt = len(i2t), len(t2i)
        self.b_img, self.b_txt = min(batch_size, self.n_img), min(batch_size, self.n_txt)
        group = 1 + max(i2t.shape[1], t2i.shape[1])
        self.anchors = max(1, min(self.b_img, self.b_txt) // group)

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        a_img = _draw(self.n_img, self.anchors, self.seed, step, 23)
        a_txt = _draw(self.n_txt, self.anchors, self.seed, step, 29)
        rng = np.random.default_rng([self.seed, step, 31])
        img = _fill([a_img, self.t2i[a_txt].ravel()], self.b_img, rng.permutation(self.n_img))
        txt = _fill([a_txt, self.i2t[a_img].ravel()], self.b_txt, rng.permutation(self.n_txt))
        return img, txt


def _fill(parts: list[np.ndarray], size: int, spare: np.ndarray) -> np.ndarray:
    out: list[int] = []
    seen: set[int] = set()
    for i in np.concatenate([*parts, spare]).tolist():
        if i not in seen and len(out) < size:
            seen.add(i)
            out.append(i)
    return np.array(out, dtype=np.int64)


# -- the cache (mcad cache: <cache>/unpaired/) ----------------------------------------------------------
def tables_key(teachers: dict, images_key: str, texts_key: str, k: int) -> str:
    """What the tables depend on besides λ's fused features: teachers, images, texts, k, format."""
    what = {"teachers": teachers, "images": images_key, "texts": texts_key, "k": int(k), "format": FORMAT}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def write_tables(out: Path, tables: UnpairedTables, key: str, config: dict, tau_f: float) -> Path:
    """tables.safetensors and manifest.json (the manifest last) in `out`."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    tensors = {"v": tables.v, "t": tables.t, "i2t": torch.as_tensor(tables.i2t), "t2i": torch.as_tensor(tables.t2i),
               "m_i2t": tables.m_i2t, "m_t2i": tables.m_t2i}
    fused = tables.h_img is not None
    if fused:
        tensors.update(h_img=tables.h_img, h_txt=tables.h_txt)
    with atomic_path(out / TABLES) as tmp:
        save_file({n: x.contiguous() for n, x in tensors.items()}, str(tmp))
    write_manifest(out / "manifest.json", kind="unpaired-teacher-cache", config=config, files=[out / TABLES],
                   format=FORMAT, key=key, sha256=sha256_file(out / TABLES), images=len(tables.v),
                   texts=len(tables.t), k=int(tables.i2t.shape[1]), fused_features=fused,
                   fused_tau_f=float(tau_f) if fused else None)
    return out


def read_tables(root: Path, key: str, fused: bool, tau_f: float, hint: str) -> UnpairedTables | None:
    """The cached tables (None: no cache there). A cache of other teachers, images, texts or k, a
    damaged file, or one without the fused features a λ > 0 run reads is one line with `hint`."""
    mf = root / "manifest.json"
    if not mf.exists():
        return None
    m = read_json(mf)
    if m.get("format") != FORMAT or m.get("key") != key:
        raise ValueError(f"{root}: unpaired teacher cache of other teachers, images, texts or "
                         f"unpaired.k than this run's: {hint}")
    if sha256_file(root / TABLES) != m.get("sha256"):
        raise ValueError(f"{root / TABLES}: content differs from the sha256 in {mf} (damaged): {hint}")
    if fused and (not m.get("fused_features") or abs(float(m.get("fused_tau_f") or 0) - tau_f) > 1e-9):
        raise ValueError(f"{root}: unpaired teacher cache without fused features at loss.tau_f={tau_f:g} (built "
                         f"with loss.lam=0 or another τ_F), this run has loss.lam > 0: {hint}")
    from safetensors.torch import load_file

    d = load_file(str(root / TABLES))
    return UnpairedTables(d["v"], d["t"], d["i2t"].numpy(), d["t2i"].numpy(), d["m_i2t"], d["m_t2i"],
                          d.get("h_img") if fused else None, d.get("h_txt") if fused else None)


# -- what the recipe and `mcad cache` read ---------------------------------------------------------------
@dataclass
class UnpairedData:
    """What the student recipe reads of the unpaired data: the images (at the student's view, which is
    D's), the texts' token ids, the teachers' tables and the batches."""
    images: object
    ids: np.ndarray
    tables: UnpairedTables
    batches: UnpairedBatches
    key: str
    record: dict

    def outputs(self, img: np.ndarray, txt: np.ndarray) -> CrossOutputs:
        return batch_outputs(self.tables, img, txt)


class UnpairedImagesOf:
    """The image indices of each step's unpaired batch (picklable for the loader)."""

    def __init__(self, batches: UnpairedBatches):
        self.batches = batches

    def __call__(self, step: int) -> np.ndarray:
        return self.batches(step)[0]


def _pools(cfg: dict, un, tset, view, paired_images=None, paired_captions=None, progress: bool = True):
    """(images, texts, D's ids, F's ids or None, the tables' key, a record of the sources): the
    unpaired sources, the paired train split's images or captions standing in for one not given."""
    from mcad.data.unpaired import load_unpaired_texts, open_unpaired_images, texts_key

    progress = progress and distributed.is_main()  # one bar under torchrun
    images = open_unpaired_images(un.images, view, cfg.get("workers"), progress) if un.images is not None \
        else paired_images
    texts = load_unpaired_texts(un.texts) if un.texts is not None else list(paired_captions)
    key = tables_key(tset.hashes, images.key([]), texts_key(texts), un.k)
    record = {"images": un.images.describe() if un.images is not None else "the train split's images",
              "texts": un.texts.describe() if un.texts is not None else "the train split's captions",
              "n_images": len(images), "n_texts": len(texts), "k": un.k, "weight": un.weight, "paired": un.paired}
    return images, texts, tset.tokenizer.encode_batch(texts), tset.fusion_ids(texts), key, record


def setup_unpaired(cfg: dict, un, tset, view, root: Path, with_f: bool, fused: bool, paired_images=None,
                   paired_captions=None, progress: bool = True) -> UnpairedData:
    """The unpaired data of a student run, with its teachers' tables: from the cache at `root` when
    there is one (checked), else computed here."""
    images, texts, ids, f_ids, key, record = _pools(cfg, un, tset, view, paired_images, paired_captions, progress)
    tau_f = float(cfg["loss"]["tau_f"])
    hint = (f"rebuild it with `mcad cache` and this run's data, teachers, unpaired.* and loss.lam (or `rm -r "
            f"{root}`: the run then computes the tables itself)")
    tables = read_tables(root, key, fused, tau_f, hint)
    if tables is None:
        log.info("unpaired: teachers over %d images and %d texts computed here (`mcad cache` keeps them)",
                 len(images), len(texts))
        tables = compute_tables(tset.dual, tset.fusion, images, ids, f_ids, un.k, tau_f, with_f, fused)
        record["teacher_outputs"] = "computed"
    else:
        log.info("unpaired: teachers from the cache %s", root)
        record["teacher_outputs"] = f"cache {root}"
    batches = UnpairedBatches(tables.i2t, tables.t2i, int(cfg["batch_size"]), int(cfg["seed"]))
    check_split(batches, int(cfg["batch_size"]), distributed.world_size())
    return UnpairedData(images, ids, tables, batches, key, record)


def check_split(batches: UnpairedBatches, batch_size: int, world: int) -> None:
    """Under torchrun each process encodes its slice of every unpaired batch (as of the paired ones):
    a batch of fewer images or texts than batch_size (all there are) must split evenly too."""
    if batches.b_img % world or batches.b_txt % world:
        fit = min(batches.n_img, batches.n_txt) // world * world
        raise ValueError(f"unpaired: batches of {batches.b_img} images and {batches.b_txt} texts (batch_size="
                         f"{batch_size} or all there are) do not split over {world} processes: give batch_size a "
                         f"multiple of {world}" + (f" of at most {fit}" if fit < batch_size else ""))


def build_unpaired(cfg: dict, un, tset, out: Path, view, paired_images=None, paired_captions=None,
                   progress: bool = True) -> Path:
    """`mcad cache` over the unpaired data: every table (F's logits always, its fused features with
    λ > 0) to `out`; F's pairs a chunk of `cache_shard_images` images at a time (the paired shards' size)."""
    images, texts, ids, f_ids, key, record = _pools(cfg, un, tset, view, paired_images, paired_captions, progress)
    tau_f, fused = float(cfg["loss"]["tau_f"]), float(cfg["loss"]["lam"]) > 0
    tables = compute_tables(tset.dual, tset.fusion, images, ids, f_ids, un.k, tau_f, True, fused,
                            chunk_images=int(cfg.get("cache_shard_images", 2048)))
    if distributed.is_main():  # one writer (every process has the tables)
        write_tables(out, tables, key, {"teachers": tset.hashes, **record}, tau_f)
    distributed.barrier()
    return out
