"""`mcad index`: encode a gallery with the student's image encoder and build a faiss index.

  mcad index PHOTOS_DIR out=runs/<name>/index run=runs/<name> [type=auto] [batch=64]
  mcad index data=synthetic split=test out=... run=runs/<name>
  mcad index PHOTOS_DIR out=... encoder=runs/<name>/export/cpu/image_encoder.onnx
  mcad index MORE_PHOTOS out=... mode=add          # encodes only paths not in the index yet
  mcad index out=... mode=rebuild type=ivfsq8      # new index type from the stored embeddings
  mcad index PHOTOS_DIR out=... run=... bind=cpu   # + search programs holding this gallery (mcad.search.bind)

Folders are scanned recursively for .jpg/.jpeg/.png/.webp. Unreadable images are reported (path +
error), counted in the manifest, and left out of the index (a later `mode=add` retries them).
type: auto | flat | sq8 | ivfsq8 | ivfpq | hnsw (see faiss_index.py); parameters nlist=,
nprobe=, m=, nbits=, M=, efConstruction=, efSearch= override the defaults.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mcad.data.spec import DEFAULT_SYNTH_ROOT, synth_json
from mcad.search import faiss_index, store
from mcad.search.common import SearchError, check_trainable, parse_args
from mcad.search.encoders import Encoder, load_image_encoder

log = logging.getLogger("mcad.search")
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}
DATASETS = {"synthetic": str(synth_json(DEFAULT_SYNTH_ROOT)), "synth": str(synth_json(DEFAULT_SYNTH_ROOT))}
PARAM_KEYS = ("nlist", "nprobe", "m", "nbits", "M", "efConstruction", "efSearch")
OPTIONS: dict[str, Any] = {
    "out": None, "index": None, "run": None, "encoder": None, "images": None, "data": None,
    "split": "test", "data_root": None, "type": "auto", "mode": "create", "batch": 64,
    "overwrite": False, "keep_embeddings": True, "threads": None, "progress": True, "bind": None,
    **{k: None for k in PARAM_KEYS},
}
MAX_SKIPPED_LISTED = 200


# -- gallery sources -------------------------------------------------------------------------------
def scan_folder(root: str | Path) -> list[str]:
    """Image files under `root`, recursively, as resolved paths. A symlink (to a file or a folder)
    is followed only when its target lies inside `root`: the index covers the folder it was given,
    not what links reach. A folder reached twice (a link loop, or two links to one place) is
    scanned once. Links left out are counted in one warning."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder")
    top = root.resolve()
    out, seen, outside, loops = [], {top}, 0, 0
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        keep = []
        for d in sorted(dirnames):
            real = (Path(dirpath) / d).resolve()
            if not real.is_relative_to(top):
                outside += 1
            elif real in seen:
                loops += 1
            else:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for f in sorted(filenames):
            if Path(f).suffix.lower() in IMAGE_EXTS:
                real = (Path(dirpath) / f).resolve()
                if real.is_relative_to(top):
                    out.append(str(real))
                else:
                    outside += 1
    if outside or loops:
        log.warning("%s: %d symlink(s) lead out of the folder and %d folder(s) were reached twice (link loops); "
                    "not followed", root, outside, loops)
    return list(dict.fromkeys(out))  # a file linked inside the folder is indexed once


def dataset_paths(data: str, split: str = "test", data_root: str | Path | None = None) -> list[str]:
    from mcad.data.karpathy import load_karpathy

    json_path = Path(DATASETS.get(data, data))
    if data_root is not None:
        json_path = Path(data_root) / (json_path.name if data in DATASETS else json_path)
    if json_path.is_dir():
        json_path = synth_json(json_path)
    corpus = load_karpathy(json_path, split=split)
    return [str(Path(p).resolve()) for p in corpus.image_paths]


# -- encoding ----------------------------------------------------------------------------------------
def encode_paths(encoder: Encoder, paths: list[str], batch: int = 64, progress: bool = True,
                 workers: int = 2) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """(embeddings [n_ok, D], ok paths, [(path, error)] of unreadable images)."""
    from PIL import Image
    from tqdm import tqdm

    from mcad.data.stream import decode_view

    view = encoder.view  # the student's training view: its dual teacher's size and resize rule
    embs: list[np.ndarray] = []
    ok: list[str] = []
    bad: list[tuple[str, str]] = []
    buf: list[np.ndarray] = []
    buf_paths: list[str] = []

    def flush() -> None:
        if buf:
            embs.append(encoder(np.stack(buf)))
            ok.extend(buf_paths)
            buf.clear()
            buf_paths.clear()

    def decode(p: str):
        try:
            return decode_view(p, view), None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return None, f"{type(e).__name__}: {e}".splitlines()[0]

    bar = tqdm(total=len(paths), desc="encode images", unit="img", disable=not progress, leave=False,
               file=sys.stderr)
    # PIL decodes outside the GIL: a few threads keep the encoder fed; results stay in path order.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for s in range(0, len(paths), batch):
            chunk = paths[s:s + batch]
            for p, (px, err) in zip(chunk, pool.map(decode, chunk)):
                if err is None:
                    buf.append(px)
                    buf_paths.append(p)
                else:
                    bad.append((p, err))
                    if len(bad) <= 20:
                        log.warning("%s: unreadable image (%s); not indexed", p, err)
            flush()
            bar.update(len(chunk))
    bar.close()
    if len(bad) > 20:
        log.warning("%d unreadable images in all (first 20 listed above; all in the index manifest)", len(bad))
    dim = int(encoder.embed_dim or (embs[0].shape[1] if embs else 0))
    emb = np.concatenate(embs).astype(np.float32) if embs else np.zeros((0, dim), np.float32)
    return emb, ok, bad


# -- building ----------------------------------------------------------------------------------------
def _params(opts: dict) -> dict:
    return {k: int(opts[k]) for k in PARAM_KEYS if opts.get(k) is not None}


def _skipped_entry(bad: list[tuple[str, str]]) -> dict:
    return {"count": len(bad), "listed": [{"path": p, "error": e} for p, e in bad[:MAX_SKIPPED_LISTED]]}


def build_index(out: str | Path, encoder: Encoder | None = None, paths: list[str] | None = None,
                kind: str = "auto", mode: str = "create", params: dict | None = None, batch: int = 64,
                keep_embeddings: bool = True, overwrite: bool = False, source: dict | None = None,
                progress: bool = True) -> dict:
    """Create, extend (`add`) or re-type (`rebuild`) the index folder `out`; returns a summary."""
    out = Path(out)
    if mode not in ("create", "add", "rebuild"):
        raise SearchError(f"mode={mode}: expected create, add or rebuild")
    if kind != "auto" and kind not in faiss_index.TYPES:
        raise SearchError(f"type={kind}: expected auto or one of {', '.join(faiss_index.TYPES)}")
    created = not out.exists()
    try:
        with store.locked(out):
            return _build_locked(out, encoder, paths, kind, mode, params, batch, keep_embeddings, overwrite, source,
                                 progress)
    except BaseException:
        if created:  # a first build that failed leaves no folder behind (not one holding only its lock)
            _remove_if_only_lock(out)
        raise


def _remove_if_only_lock(out: Path) -> None:
    from mcad.io import LOCK_NAME

    if out.is_dir() and all(p.name == LOCK_NAME for p in out.iterdir()):
        (out / LOCK_NAME).unlink(missing_ok=True)
        try:
            out.rmdir()
        except OSError:  # another process made something there meanwhile: it stays
            pass


def _build_locked(out: Path, encoder: Encoder | None, paths: list[str] | None, kind: str, mode: str,
                  params: dict | None, batch: int, keep_embeddings: bool, overwrite: bool, source: dict | None,
                  progress: bool) -> dict:
    if mode == "create":
        if store.exists(out) and not overwrite:
            raise SearchError(f"{out}: an index exists there (use mode=add to extend it, "
                              f"mode=rebuild to change its type, or overwrite=true)")
        return _create(out, encoder, paths or [], kind, params or {}, batch, keep_embeddings, source, progress)
    if not store.exists(out):
        if mode == "rebuild":
            raise SearchError(f"{out}: no index to rebuild")
        log.info("%s: no index yet; mode=add creates it", out)
        return _create(out, encoder, paths or [], kind, params or {}, batch, keep_embeddings, source, progress)
    folder = store.load(out, with_embeddings=True)
    if mode == "rebuild":
        return _rebuild(folder, kind, params or {}, reason="mode=rebuild")
    return _add(folder, encoder, paths or [], kind, params or {}, batch, source, progress)


def _index_manifest(kind: str, chosen_by: str, params: dict) -> dict:
    return {"type": kind, "chosen_by": chosen_by, "metric": faiss_index.metric_of(kind), "params": params}


def _check_same_student(folder: store.IndexFolder, encoder: Encoder) -> None:
    have = folder.manifest["student"]["sha256"]
    if encoder.student.sha256 != have:
        raise SearchError(f"{folder.root}: index was built with student {folder.manifest['student'].get('path')} "
                          f"(sha256 {have[:12]}), not {encoder.student.short()}; build a new index for it")
    if encoder.embed_dim and int(encoder.embed_dim) != folder.dim:
        raise SearchError(f"{folder.root}: index dim {folder.dim} != encoder dim {encoder.embed_dim}")


def _create(out: Path, encoder: Encoder | None, paths: list[str], kind: str, params: dict, batch: int,
            keep_embeddings: bool, source: dict | None, progress: bool) -> dict:
    if encoder is None:
        raise SearchError("which student? give run=runs/<name> or encoder=<exported image encoder>")
    paths = list(dict.fromkeys(paths))
    if not paths:
        raise SearchError("no images to index (an empty folder? give a folder with .jpg/.png/.webp, or data=synthetic)")
    check_trainable(kind, len(paths), params, encoder.embed_dim)  # too few even if every image reads: say it now
    t0 = time.perf_counter()
    emb, ok, bad = encode_paths(encoder, paths, batch, progress)
    t_enc = time.perf_counter() - t0
    if not ok:
        raise SearchError(f"none of the {len(paths)} images could be read (first: {bad[0][0]}: {bad[0][1]})")
    chosen_by = "flag"
    if kind == "auto":
        kind, chosen_by = faiss_index.auto_type(len(ok), emb.shape[1]), "auto"
    check_trainable(kind, len(ok), params, emb.shape[1])
    t1 = time.perf_counter()
    index, used = faiss_index.build(emb, kind, params)
    t_build = time.perf_counter() - t1
    manifest = {
        "kind": "search-index",
        "student": encoder.student.to_json(),
        "encoder": encoder.describe(),
        "index": _index_manifest(kind, chosen_by, used),
        "sources": [source] if source else [],
        "skipped": _skipped_entry(bad),
        "history": [{"time": store.now_iso(), "mode": "create", "added": len(ok), "skipped": len(bad),
                     "encode_s": round(t_enc, 3), "build_s": round(t_build, 3)}],
    }
    folder = store.IndexFolder(out, manifest, index, ok, emb if keep_embeddings else None)
    store.save(folder)
    return _summary(folder, added=len(ok), skipped=bad, encoded=len(paths), encode_s=t_enc, build_s=t_build)


def _add(folder: store.IndexFolder, encoder: Encoder | None, paths: list[str], kind: str, params: dict,
         batch: int, source: dict | None, progress: bool) -> dict:
    if encoder is None:
        raise SearchError("which student? give run= or encoder=")
    _check_same_student(folder, encoder)
    was, now = folder.manifest.get("encoder", {}), encoder.describe()
    if (was.get("kind"), was.get("sha256")) != (now.get("kind"), now.get("sha256")):
        log.warning("%s: built with encoder %s, extending with %s (same student; embeddings may differ slightly)",
                    folder.root, was.get("file"), now.get("file"))
        folder.manifest.setdefault("encoders_added", []).append(now)
    have = set(folder.paths)
    new = [p for p in dict.fromkeys(paths) if p not in have]
    log.info("%s: %d of %d paths already indexed; encoding %d new", folder.root, len(paths) - len(new), len(paths), len(new))
    if not new:
        return _summary(folder, added=0, skipped=[], encoded=0, encode_s=0.0, build_s=0.0, saved=False)
    t0 = time.perf_counter()
    emb, ok, bad = encode_paths(encoder, new, batch, progress)
    t_enc = time.perf_counter() - t0
    if not ok:  # only unreadable images again: nothing to write
        return _summary(folder, added=0, skipped=bad, encoded=len(new), encode_s=t_enc, build_s=0.0, saved=False)
    m = folder.manifest
    m["skipped"] = _skipped_entry(bad)
    if source and source not in m.setdefault("sources", []):
        m["sources"].append(source)
    t1 = time.perf_counter()
    folder.index.add(np.ascontiguousarray(emb, dtype=np.float32))
    folder.paths.extend(ok)
    if folder.embeddings is not None:
        folder.embeddings = np.concatenate([folder.embeddings, emb])
    m.setdefault("history", []).append({"time": store.now_iso(), "mode": "add", "added": len(ok),
                                        "skipped": len(bad), "encode_s": round(t_enc, 3)})
    # A gallery that outgrew its type (auto) or its IVF training is rebuilt from the stored embeddings.
    n, cur = folder.index.ntotal, folder.kind
    want = faiss_index.auto_type(n, folder.dim) if m["index"].get("chosen_by") == "auto" else cur
    if kind not in ("auto", cur):
        want = kind
    stale_ivf = cur in ("ivfsq8", "ivfpq") and n > 4 * int(folder.params.get("trained_on", n))
    if folder.embeddings is not None and (want != cur or stale_ivf):
        reason = f"type {cur} -> {want}" if want != cur else f"IVF trained on {folder.params.get('trained_on')} of {n}"
        return _rebuild(folder, want, params, reason=reason, added=len(ok), skipped=bad, encode_s=t_enc,
                        chosen_by=m["index"].get("chosen_by", "flag"))
    if stale_ivf:
        log.warning("%s: IVF lists were trained on %s vectors, index now holds %d; recall may drop "
                    "(no stored embeddings to retrain from: rebuild with mode=create overwrite=true)",
                    folder.root, folder.params.get("trained_on"), n)
    store.save(folder)
    return _summary(folder, added=len(ok), skipped=bad, encoded=len(new), encode_s=t_enc,
                    build_s=time.perf_counter() - t1)


def _rebuild(folder: store.IndexFolder, kind: str, params: dict, reason: str, added: int = 0,
             skipped: list | None = None, encode_s: float = 0.0, chosen_by: str = "flag") -> dict:
    if folder.embeddings is None:
        raise SearchError(f"{folder.root}: no stored embeddings (built with keep_embeddings=false); "
                          f"rebuild with mode=create overwrite=true")
    if kind == "auto":
        kind, chosen_by = faiss_index.auto_type(len(folder.paths), folder.dim), "auto"
    keep = {k: v for k, v in folder.params.items() if k in PARAM_KEYS} if kind == folder.kind else {}
    for k in ("nlist", "nprobe", "m", "nbits"):  # sized for the new gallery unless given
        keep.pop(k, None)
    check_trainable(kind, len(folder.embeddings), {**keep, **params}, folder.dim)
    t1 = time.perf_counter()
    folder.index, used = faiss_index.build(folder.embeddings, kind, {**keep, **params})
    t_build = time.perf_counter() - t1
    log.info("%s: rebuilt as %s (%s) in %.1f s", folder.root, kind, reason, t_build)
    folder.manifest["index"] = _index_manifest(kind, chosen_by, used)
    folder.manifest.setdefault("history", []).append({"time": store.now_iso(), "mode": "rebuild",
                                                      "reason": reason, "build_s": round(t_build, 3)})
    store.save(folder)
    return _summary(folder, added=added, skipped=skipped or [], encoded=added + len(skipped or []),
                    encode_s=encode_s, build_s=t_build)


def _summary(folder: store.IndexFolder, added: int, skipped: list, encoded: int, encode_s: float,
             build_s: float, saved: bool = True) -> dict:
    return {"index": str(folder.root), "type": folder.kind, "count": int(folder.index.ntotal),
            "dim": folder.dim, "added": added, "encoded": encoded, "skipped": len(skipped),
            "skipped_paths": [p for p, _ in skipped], "encode_s": round(encode_s, 3),
            "build_s": round(build_s, 3), "saved": saved}


# -- CLI ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    pos, opts, _ = parse_args(list(argv or []), OPTIONS, positional=1, usage=__doc__ or "")
    out = opts["out"] or opts["index"]
    if not out:
        raise SearchError("where? give out=<index folder> (e.g. out=runs/<name>/index)")
    if opts["bind"]:  # before any image is encoded
        from mcad.search.bind import TARGETS

        if str(opts["bind"]) not in TARGETS:
            raise SearchError(f"bind={opts['bind']}: expected one of {', '.join(TARGETS)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SearchError(f"out={out}: is a file, not an index folder; give a folder path (e.g. out={out.parent / 'index'})")
    if opts["threads"]:
        import torch

        torch.set_num_threads(int(opts["threads"]))
    folder_src = pos[0] if pos else opts["images"]
    mode = str(opts["mode"])
    paths: list[str] = []
    source = None
    if folder_src and opts["data"]:
        raise SearchError("give either an image folder or data=..., not both")
    if folder_src:
        paths, source = scan_folder(folder_src), {"kind": "folder", "path": str(Path(folder_src).resolve())}
        if not paths:
            raise SearchError(f"{folder_src}: no .jpg/.jpeg/.png/.webp images in it (searched recursively)")
    elif opts["data"]:
        paths = dataset_paths(str(opts["data"]), str(opts["split"]), opts["data_root"])
        source = {"kind": "data", "data": str(opts["data"]), "split": str(opts["split"])}
    elif mode != "rebuild":
        raise SearchError("what to index? give an image folder or data=synthetic [split=test]")
    if mode == "create":  # a type the gallery cannot train is refused before the student is loaded
        check_trainable(str(opts["type"]), len(paths), _params(opts))

    encoder = None
    if mode != "rebuild":
        run, enc = opts["run"], opts["encoder"]
        if not run and not enc and mode == "add" and store.exists(out):
            m = store.read_manifest(out)  # extend with the encoder the index was built with
            if m["encoder"].get("kind") == "artifact":
                enc = m["encoder"]["file"]
            else:
                run = m["student"]["run"]
        encoder = load_image_encoder(run=run, encoder=enc, threads=opts["threads"])
    s = build_index(out, encoder, paths, kind=str(opts["type"]), mode=mode, params=_params(opts),
                    batch=int(opts["batch"]), keep_embeddings=bool(opts["keep_embeddings"]),
                    overwrite=bool(opts["overwrite"]), source=source, progress=bool(opts["progress"]))
    verb = {"create": "indexed", "add": "added", "rebuild": "rebuilt"}[mode]
    n = s["added"] if mode != "rebuild" else s["count"]
    print(f"{verb} {n} images -> {s['index']} ({s['type']}, {s['count']} x {s['dim']}; "
          f"encoded {s['encoded']} in {s['encode_s']:.1f} s, index built in {s['build_s']:.1f} s)")
    if s["skipped"]:
        print(f"skipped {s['skipped']} unreadable images (listed in {out / store.MANIFEST} 'skipped'):")
        for p in s["skipped_paths"][:10]:
            print(f"  {p}")
    return _bind(out, opts) if opts["bind"] else 0


def _bind(out: Path, opts: dict) -> int:
    """bind=<target>: the search programs holding this index's gallery; 1 when one misses a parity bar."""
    from mcad.export.parity import table
    from mcad.search.bind import bind_programs, programs_folder

    m = bind_programs(out, str(opts["bind"]), run=opts["run"], progress=bool(opts["progress"]))
    print(f"bound the index's gallery into search programs: {programs_folder(out, str(opts['bind']))}/")
    for a in m["artifacts"]:
        b = a.get("notes", {}).get("gallery_bound")
        print(f"  {a['file']:<36} {a['runtime']:<12} " + (f"holds {b['n']} x {b['dim']} {b['dtype']}" if b else
                                                          "run-time gallery" if a["role"] == "search" else "text encoder"))
    if m.get("parity"):
        print(table(m["parity"]))
    return 0 if not m.get("parity") or m["parity"]["pass"] else 1
