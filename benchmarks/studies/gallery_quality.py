"""What a compressed gallery costs in retrieval quality, through the device runner's own scan
(mcad.device.runner.Scorer: faiss flat, SQfp16, SQ8 with per-dimension ranges, and SQ8 with an exact
re-rank of the 4 x 10 best from the fp32 rows on disk).

  python benchmarks/studies/gallery_quality.py [run=runs/<name>] [data=data/synth] [results=benchmarks/results]

Two galleries of the run's student image embeddings (eager fp32 encoders): the test split (1,000
images: text -> image R@1/5/10 of the test captions, the device search's direction) and every image
of the data set (train + val + test: recall@10 of the test captions' top-10 against the fp32 scan).
Writes gallery_quality-<run>.{json,md} to `results` (none: only print)."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from mcad.config import parse_overrides

OPTIONS = {"run": None, "data": None, "results": "benchmarks/results", "k": 10}
VARIANTS = (("fp32", 0), ("fp16", 0), ("int8", 0), ("int8", 4))


def embeddings(run: Path, data, split: str):
    """(image embeddings, caption embeddings, caption -> image) of one split, by the run's student."""
    from mcad.data.spec import open_split
    from mcad.evaluate import encode_images, encode_texts
    from mcad.runs import load_student

    model, tok = load_student(run)
    images, corpus = open_split(data, split, model.image_view, progress=False)
    img = encode_images(model, images).numpy()
    txt = encode_texts(model, tok.encode_batch(corpus.captions)).numpy()
    return img, txt, corpus.caption_to_image


def scan_top(gallery: np.ndarray, queries: np.ndarray, dtype: str, rerank: int, k: int, tmp: Path) -> np.ndarray:
    """The runner's top-k of each query over `gallery` stored as `dtype`."""
    from mcad.device.runner import Scorer

    f = tmp / f"gallery-{len(gallery)}.npy"
    if not f.exists():
        np.save(f, np.ascontiguousarray(gallery, dtype=np.float32))
    sc = Scorer("faiss", {"n": len(gallery), "file": str(f), "dtype": dtype, "rerank": rerank}, k, gallery.shape[1])
    return np.stack([sc.search(q) for q in queries]), sc.bytes()


def measure(run: Path, data, k: int) -> dict:
    img, txt, c2i = embeddings(run, data, "test")
    parts = [embeddings(run, data, s)[0] for s in ("train", "val")]
    everything = np.concatenate(parts + [img])
    rows = []
    with tempfile.TemporaryDirectory(prefix="mcad-gallery-quality-") as tmp:
        exact_all, _ = scan_top(everything, txt, "fp32", 0, k, Path(tmp))
        for dtype, rerank in VARIANTS:
            top, nbytes = scan_top(img, txt, dtype, rerank, k, Path(tmp))
            hit = top == c2i[:, None]
            top_all, bytes_all = scan_top(everything, txt, dtype, rerank, k, Path(tmp))
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_all, exact_all)]))
            rows.append({"gallery": dtype, "rerank": rerank, "t2i_r1": round(100 * float(hit[:, 0].mean()), 2),
                         "t2i_r5": round(100 * float(hit[:, :5].any(1).mean()), 2),
                         "t2i_r10": round(100 * float(hit.any(1).mean()), 2),
                         "recall_at_10_vs_fp32": round(recall, 4), "bytes_per_image": nbytes // len(img),
                         "gallery_all": len(everything)})
    return {"run": str(run), "test_images": len(img), "test_captions": len(txt), "rows": rows}


def markdown(res: dict, meta: dict) -> str:
    lines = [f"# Compressed galleries: retrieval quality ({Path(res['run']).name})", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ", f"Machine: {meta['machine']}", "",
             f"The device runner's scan (mcad.device.runner.Scorer) over the student's image embeddings. "
             f"R@k: text -> image on the test split ({res['test_images']:,} images, {res['test_captions']:,} "
             f"captions). Recall@10: the test captions' top-10 over every image of the data set "
             f"({res['rows'][0]['gallery_all']:,}) against the fp32 scan's.", "",
             "| gallery | re-rank | bytes / image | t2i R@1 | R@5 | R@10 | recall@10 vs fp32 |", "|---|---|--:|--:|--:|--:|--:|"]
    for r in res["rows"]:
        rr = "exact, 4 x 10 from fp32 rows on disk" if r["rerank"] else "-"
        lines.append(f"| {r['gallery']} | {rr} | {r['bytes_per_image']} | {r['t2i_r1']:.2f} | {r['t2i_r5']:.2f} | "
                     f"{r['t2i_r10']:.2f} | {r['recall_at_10_vs_fp32']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from summary import publish
    from mcad.data.spec import DEFAULT_SYNTH_ROOT
    from mcad.runs import latest_run, resolve_run

    opts = parse_overrides(list(argv or []), OPTIONS, types={"run": str, "data": str}).config
    run = resolve_run(opts["run"]) if opts["run"] else latest_run("runs")
    res = measure(run, opts["data"] or DEFAULT_SYNTH_ROOT, int(opts["k"]))
    publish("benchmarks/studies/gallery_quality.py", argv, res, markdown, opts["results"], f"gallery_quality-{run.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
