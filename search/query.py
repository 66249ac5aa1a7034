"""`mcad search "TEXT" index=DIR [k=5] [--json]`: the top-k images of an index for a text query.

The text encoder is the student the index was built with (read from the index manifest), or the
one given by run=runs/<name> / encoder=runs/<name>/export/<target>/text_encoder.*; the tokenizer is
the run folder's tokenizer.json (the training one). An index built by another student (sha256 of
student.safetensors differs) or of another dimension is refused. nprobe= / efSearch= override the
index's search parameters. Lossy types (sq8, ivfsq8, ivfpq) re-rank a shortlist of rerank*k
(default 4) with the exact embeddings the index folder keeps on disk; rerank=0 turns that off.
A query the tokenizer cannot represent (words it knows only as unknown tokens, or a tail cut at the
context length) gets one line saying so beside the results (`note` in --json).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from mcad.search import faiss_index, store
from mcad.search.common import SearchError, parse_args
from mcad.search.encoders import load_text_encoder

OPTIONS: dict[str, Any] = {"index": None, "k": 5, "run": None, "encoder": None, "nprobe": None,
                           "efSearch": None, "rerank": None, "threads": 1, "json": None}


class Searcher:
    """An index folder + the matching text encoder: `searcher(texts, k) -> [[(score, path), ...]]`."""

    def __init__(self, index_dir: str | Path, run: str | Path | None = None, encoder: str | Path | None = None,
                 threads: int | None = 1, nprobe: int | None = None, efSearch: int | None = None,
                 rerank: int | None = None):
        index_dir = Path(index_dir)
        m = store.read_manifest(index_dir)
        if not run and not encoder:
            run = m["student"].get("run")
            if not run or not Path(run).is_dir():
                raise SearchError(f"{index_dir}: its student run folder {run!r} is gone; give run= or encoder=")
        self.encoder, self.tokenizer = load_text_encoder(run=run, encoder=encoder, threads=threads)
        want = m["student"]["sha256"]
        got = self.encoder.student.sha256
        if got != want:
            raise SearchError(
                f"{index_dir}: index was built with student {m['student'].get('path')} (sha256 {want[:12]}) but "
                f"the query encoder is student {self.encoder.student.short()}; query with that student "
                f"or rebuild the index with `mcad index ... run=<this run>`")
        if self.encoder.embed_dim and int(self.encoder.embed_dim) != int(m["dim"]):
            raise SearchError(f"{index_dir}: index dim {m['dim']} != text encoder dim {self.encoder.embed_dim}")
        self.folder = store.load(index_dir)
        params = dict(self.folder.params)
        if nprobe:
            params["nprobe"] = int(nprobe)
        if efSearch:
            params["efSearch"] = int(efSearch)
        if threads:
            import faiss

            faiss.omp_set_num_threads(int(threads))
        faiss_index.set_search_params(self.folder.index, self.folder.kind, params)
        # lossy index types re-rank a shortlist with the exact embeddings kept on disk (if kept)
        self.vectors = store.vectors(self.folder) if self.folder.kind in faiss_index.RERANKABLE else None
        self.rerank = int(faiss_index.DEFAULT_RERANK if rerank is None else rerank) if self.vectors is not None else 0

    def encode(self, texts: list[str]):
        q = self.encoder(self.tokenizer.encode_batch(texts))
        if q.shape[1] != self.folder.dim:
            raise SearchError(f"{self.folder.root}: index dim {self.folder.dim} != query embedding dim {q.shape[1]}")
        return q

    def search(self, texts: list[str], k: int = 5) -> list[list[dict]]:
        q = self.encode(texts)
        D, I = faiss_index.search(self.folder.index, self.folder.kind, q, k, rerank=self.rerank, vectors=self.vectors)
        return [[{"rank": r + 1, "id": int(i), "score": float(s), "path": self.folder.paths[int(i)]}
                 for r, (s, i) in enumerate(zip(Ds, Is)) if i >= 0] for Ds, Is in zip(D, I)]


def main(argv: list[str] | None = None) -> int:
    pos, opts, flags = parse_args(list(argv or []), OPTIONS, flags=("json",), positional=1, usage=__doc__ or "")
    if not pos or not pos[0].strip():
        raise SearchError('what to search for? mcad search "a red circle left of a blue square" index=DIR')
    if not opts["index"]:
        raise SearchError("which index? give index=<folder written by `mcad index`>")
    k = int(opts["k"])
    if k < 1:
        raise SearchError(f"k={k}: expected a positive number of results")
    t0 = time.perf_counter()
    s = Searcher(opts["index"], run=opts["run"], encoder=opts["encoder"], threads=opts["threads"],
                 nprobe=opts["nprobe"], efSearch=opts["efSearch"], rerank=opts["rerank"])
    t1 = time.perf_counter()
    hits = s.search([pos[0]], k)[0]
    t2 = time.perf_counter()
    note = s.tokenizer.unrepresented(pos[0])
    as_json = "json" in flags or str(opts.get("json")).lower() in ("true", "1", "yes")
    if note:
        print(f"mcad search: note: {note}", file=sys.stderr)
    if as_json:
        print(json.dumps({"query": pos[0], "note": note, "index": str(opts["index"]), "k": k, "type": s.folder.kind,
                          "count": int(s.folder.index.ntotal), "rerank": s.rerank, "student": s.folder.manifest["student"]["sha256"],
                          "encoder": s.encoder.describe(), "load_s": round(t1 - t0, 4),
                          "query_s": round(t2 - t1, 4), "results": hits}, indent=2))
    else:
        for h in hits:
            print(f"{h['rank']:>3}  {h['score']:.4f}  {h['path']}")
    return 0
