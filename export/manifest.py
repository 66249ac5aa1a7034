"""The export folder's records: golden.npz (a few held-out inputs with the eager fp32 student's
outputs, for a device to check itself against) and the manifest (mcad.artifacts.ExportManifest)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mcad.artifacts import Artifact, ExportManifest, Tensor
from mcad.export.backends.common import Built, Job, eager_embed
from mcad.export.check import Heldout
from mcad.export.programs import INPUT_NAMES, NAMES, OUTPUT_NAMES, SEARCH_K
from mcad.io import atomic_path, now_iso, sha256_file, versions


def write_golden(job: Job, held: Heldout, tokenizer, n: int = 4, gallery: int = 100) -> Path:
    from mcad.export.programs import brute_force_topk

    ids = held.test.ids[:n]
    px = held.test.pixels[:n]
    te = held.ref["text"][:n]
    ie = eager_embed(job.encoders["image"], torch.as_tensor(px))
    g = held.gallery[:max(gallery, SEARCH_K)]
    _, v, i = brute_force_topk(torch.as_tensor(te), torch.as_tensor(g), SEARCH_K)
    texts = np.array([tokenizer.decode(r) for r in ids])  # ids are what a device feeds; texts for humans
    path = job.out / "golden.npz"
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=ids.astype(np.int64), captions=texts, pixels=px.astype(np.float32),
                     text_emb=te.astype(np.float32), image_emb=ie.astype(np.float32),
                     gallery=g.astype(np.float32), topk_scores=v.numpy().astype(np.float32),
                     topk_indices=i.numpy().astype(np.int64))
    return path


def io_spec(a: Built, job: Job) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs/outputs as the runtime reports them, named after the program's arguments."""
    spec = a.meta or _reported(a)
    ins, outs = spec.get("inputs"), spec.get("outputs")
    D = job.towers.embed_dim
    if not ins:  # not openable here (a device-only runtime): what the program was traced with
        ex = job.example(a.role, layout=a.notes.get("gallery_layout") or "rows")
        ex = ex[:1] if "gallery_bound" in a.notes else ex  # a bound program takes the ids only
        ins = [{"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")} for x in ex]
        outs = [{"shape": [1, D], "dtype": "float32"}] if a.role != "search" else \
            [{"shape": [1, SEARCH_K], "dtype": "float32"}, {"shape": [1, SEARCH_K], "dtype": "int64"}]
    ins = [Tensor(n, list(x["shape"]), x["dtype"], x.get("quantization")) for x, n in zip(ins, INPUT_NAMES[a.role])]
    outs = [Tensor(n, list(x["shape"]), x["dtype"], x.get("quantization")) for x, n in zip(outs, OUTPUT_NAMES[a.role])]
    if a.role == "search" and len(ins) > 1:
        ins[1].shape = [D, "N"] if a.notes.get("gallery_layout") == "columns" else ["N", D]
    return ins, outs


def _reported(a: Built) -> dict:
    """Not run (parity off): ONNX Runtime and LiteRT still say what the file takes (cheap)."""
    from mcad.runtimes import open_artifact

    if a.runtime not in ("onnxruntime", "litert"):
        return {}
    with open_artifact(a.path, a.runtime, names=INPUT_NAMES[a.role]) as s:
        return s.spec()


def artifact(a: Built, job: Job, parity: dict | None) -> Artifact:
    ins, outs = io_spec(a, job)
    rec = (parity or {}).get("artifacts", {}).get(a.path.name, {})
    return Artifact(name=NAMES[a.role], role=a.role, runtime=a.runtime, backend=a.backend,
                    file=a.path.name, bytes=a.path.stat().st_size, sha256=sha256_file(a.path),
                    quantization=a.quantization, inputs=ins, outputs=outs,
                    k=SEARCH_K if a.role == "search" else None,
                    notes={k: v for k, v in a.notes.items() if v is not None and k != "group"},
                    parity_pass=rec.get("pass"))


def manifest(job: Job, run: Path | None, student_sha: str | None, record: dict, parity: dict | None,
             golden: str | None, tokenizer: bool) -> ExportManifest:
    """`record`: the run's own manifest (its preprocessing and teachers are carried over)."""
    from mcad.preprocess import record as preprocess_record
    from mcad.quantize.pt2e import parse_keep

    t, o = job.towers, job.opts
    preprocess = None
    if t.image_encoder is not None:  # how the image input is made from a file: the run's record (its teacher's view)
        preprocess = record.get("preprocess") or preprocess_record(t, t.view)
    return ExportManifest(
        target=o.target, run=str(run) if run else None, model=t.name,
        student_sha256=student_sha,
        created=now_iso(), embed_dim=t.embed_dim,
        context_length=t.context_length if t.text_encoder is not None else 0,
        image_size=t.image_size if t.image_encoder is not None else 0,
        image_mean=list(t.image_mean), image_std=list(t.image_std),
        tokenizer="tokenizer.json" if tokenizer else None, golden=golden,
        soc=job.soc if o.target != "cpu" else None, precision=o.precision,
        keep_fp32={b: ["l2-normalize", *parse_keep(o.keep_fp32, "litert" if b == "tflite" else b)]
                   for b in o.plan() if b != "hub"},
        calibration={"source": job.calib.source, "images": int(len(job.calib)), "captions": int(len(job.calib.ids)),
                     "seed": o.seed},
        artifacts=[artifact(a, job, parity) for a in job.artifacts], skipped=job.skipped, parity=parity,
        versions=versions(), preprocess=preprocess, teachers=record.get("teachers"))
