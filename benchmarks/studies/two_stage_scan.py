"""Two-stage gallery scans for the on-device runner: a short code of every photo, scanned without
decoding it to float, then exact re-rank of the best R from the fp32 rows on disk (read by pread,
so never resident), against faiss's exact flat scan (IndexFlatIP) in the same process, one thread.

  python benchmarks/studies/two_stage_scan.py [sizes=100000,1000000] [galleries=random,events,powerlaw]
      [depths=100,200,500,1000] [queries=100] [timed=30] [rounds=3] [results=benchmarks/results]

First stages, each built from the gallery rows alone (no host-side training):
- `sq8+rr4`: the runner's int8 gallery as it stands (faiss SQ8, decoded per row), k*4 re-ranked.
- `binary`: faiss IndexBinaryFlat over the sign bits of the rows less their mean (D/8 bytes), Hamming.
- `rabitq-fs`: faiss IndexRaBitQFastScan, 1 bit per dimension and two factors per row (its only
  training is the mean); asymmetric estimate of the inner product.
- `pq4fs-m<M>`: the runner's `dtype=pq4` gallery (device/runner.py TwoStage) with pq_m = M = D/2, D/4,
  D/8: faiss IndexPQFastScan, M sub-quantizers of 4 bits (M/2 bytes a photo), codebooks trained by
  faiss's k-means on rows evenly spaced over the gallery, in a faiss IndexIDMap (8 B a photo).
A Matryoshka prefix is not measured: its point is a student trained so that the prefix ranks well,
and no such student exists here; the prefix of an untrained embedding is a random projection.

Galleries (unit vectors, D = `dim`): `random` (uniform on the sphere, queries too: the worst case of
any coarse code, every neighbour about equidistant); `events` (photos in events of `event` photos,
events drawn around `themes` themes: event centre = unit(theme + 0.8 n), photo = unit(event + 0.5 n),
n ~ N(0, I/D), plus a shared offset 0.5 c (embeddings share a cone); queries = unit(event + 0.8 n) plus
a fixed offset 0.8 g (the text/image modality gap)); `powerlaw` (the same with n's covariance
spectrum falling as 1/i in a random basis: a low effective dimension). Each gallery's cosine
statistics are reported beside the table. recall@10 is against exact fp32 search over the same rows.
Timings are the search thread's CPU time, and ratios against IndexFlatIP measured in the same round
(the machine may be shared).
Writes two_stage_scan.{json,md} to `results` (none: only print)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mcad.config import parse_overrides

OPTIONS = {"sizes": [100_000, 1_000_000], "dim": 256, "galleries": ["random", "events", "powerlaw"],
           "depths": [100, 200, 500, 1000], "queries": 100, "timed": 30, "rounds": 3, "k": 10, "seed": 0,
           "themes": 200, "event": 50, "results": "benchmarks/results"}
TYPES = {"sizes": list[int], "galleries": list[str], "depths": list[int]}
RUNNER = Path(__file__).resolve().parents[2] / "device" / "runner.py"
CHUNK = 65536


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


class Gallery:
    """A seeded gallery model: its rows streamed in chunks and its queries (see the module docstring)."""

    def __init__(self, kind: str, n: int, dim: int, seed: int, themes: int, event: int):
        if kind not in ("random", "events", "powerlaw"):
            raise ValueError(f"galleries={kind}: expected some of random, events, powerlaw")
        self.kind, self.n, self.dim, self.seed = kind, n, dim, seed
        rng = np.random.default_rng([seed, 0])
        self.shape = None
        if kind == "powerlaw":
            basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
            lam = 1.0 / np.arange(1, dim + 1)
            self.shape = (basis * np.sqrt(lam / lam.mean())).T.astype(np.float32)
        self.cone, self.gap = _unit(rng.standard_normal(dim)), _unit(rng.standard_normal(dim))
        theme = _unit(self._noise(rng, themes))
        n_events = max(1, n // event)
        self.events = _unit(theme[rng.integers(0, themes, n_events)] + 0.8 * self._noise(rng, n_events))

    def _noise(self, rng, m: int):
        z = rng.standard_normal((m, self.dim), dtype=np.float32) / np.sqrt(self.dim)
        return z @ self.shape if self.shape is not None else z

    def _around(self, rng, ev, spread: float, offset):
        return _unit(_unit(self.events[ev] + spread * self._noise(rng, len(ev))) + 0.5 * self.cone + offset)

    def rows(self):
        for start in range(0, self.n, CHUNK):
            rng = np.random.default_rng([self.seed, 1, start])
            m = min(CHUNK, self.n - start)
            if self.kind == "random":
                yield _unit(rng.standard_normal((m, self.dim), dtype=np.float32))
                continue
            # a photo's event by a hash of its row: an event's photos are spread over the file
            ev = (np.arange(start, start + m, dtype=np.int64) * 2654435761) % len(self.events)
            yield self._around(rng, ev, 0.5, 0.0)

    def queries(self, m: int):
        rng = np.random.default_rng([self.seed, 2])
        if self.kind == "random":
            return _unit(rng.standard_normal((m, self.dim), dtype=np.float32))
        return self._around(rng, rng.integers(0, len(self.events), m), 0.8, 0.8 * self.gap)


def write_rows(gal: Gallery, path: Path) -> Path:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(gal.n, gal.dim))
    pos = 0
    for c in gal.rows():
        out[pos:pos + len(c)] = c
        pos += len(c)
    out.flush()
    del out
    return path


def exact_top(path: Path, q, k: int):
    """Exact fp32 top-k and the cosine statistics of the gallery, a chunk of rows at a time."""
    rows = np.load(path, mmap_mode="r")
    best_s, best_i = np.full((len(q), 0), -np.inf, np.float32), np.zeros((len(q), 0), np.int64)
    keep = 100
    for start in range(0, len(rows), CHUNK):
        s = q @ np.asarray(rows[start:start + CHUNK]).T
        s_all, i_all = np.concatenate([best_s, s], 1), np.concatenate(
            [best_i, np.broadcast_to(np.arange(start, start + s.shape[1]), s.shape)], 1)
        part = np.argsort(-s_all, axis=1, kind="stable")[:, :keep]
        best_s, best_i = np.take_along_axis(s_all, part, 1), np.take_along_axis(i_all, part, 1)
    sample = np.asarray(rows[:2000])
    stats = {"pair_cos_mean": float((sample[:1000] @ sample[1000:].T).mean()),
             "query_top1_cos": float(best_s[:, 0].mean()), "query_top10_cos": float(best_s[:, k - 1].mean()),
             "query_top100_cos": float(best_s[:, min(99, best_s.shape[1] - 1)].mean())}
    return best_i[:, :k], {key: round(v, 3) for key, v in stats.items()}


class TwoStage:
    """A first-stage index's top R, re-ranked exactly from the rows on disk: what the runner does."""

    def __init__(self, first, store, k: int):
        self.first, self.store, self.k = first, store, k

    def search(self, q, depth: int):
        _, idx = self.first(q, depth)
        cand = np.sort(idx[0][idx[0] >= 0])
        scores = self.store.read(cand) @ q[0]
        top = np.argpartition(-scores, self.k - 1)[:self.k]
        return cand[top[np.lexsort((cand[top], -scores[top]))]]


def build(path: Path, gal: Gallery, k: int, seed: int):
    """{name: (search(q, depth) -> ids, depths or None, resident bytes, build seconds)}: every candidate."""
    import faiss

    from mcad.device import runner

    faiss.omp_set_num_threads(1)
    n, d, f = gal.n, gal.dim, str(path)
    spec = {"n": n, "file": f, "seed": seed}
    out, t = {}, time.perf_counter()
    flat = runner.Scorer("faiss", dict(spec, dtype="fp32"), k, d)
    out["flat"] = (lambda q, r: flat.search(q), None, flat.bytes(), time.perf_counter() - t)
    t = time.perf_counter()
    sq = runner.Scorer("faiss", dict(spec, dtype="int8", rerank=4), k, d)
    out["sq8+rr4"] = (lambda q, r: sq.search(q), None, sq.bytes(), time.perf_counter() - t)
    store = None
    for m in (d // 2, d // 4, d // 8):
        t = time.perf_counter()
        pq = runner.TwoStage(dict(spec, dtype="pq4", pq_m=m), k, d, lambda: runner.gallery_chunks(spec, d))
        store = store or pq.store
        out[f"pq4fs-m{m}"] = (TwoStage(pq.index.search, store, k).search, True, pq.bytes(), time.perf_counter() - t)
    sample = runner._sample_rows(runner.gallery_chunks(spec, d), n, d)
    mean = sample.mean(0)
    for name, make in (("rabitq-fs", lambda: faiss.IndexRaBitQFastScan(d, faiss.METRIC_INNER_PRODUCT)),
                       ("binary", lambda: faiss.IndexBinaryFlat(d))):
        t = time.perf_counter()
        index = make()
        binary = name == "binary"
        if not binary:
            index.train(sample)
        for c in runner.gallery_chunks(spec, d, CHUNK):
            index.add(np.packbits(c > mean, axis=1) if binary else np.ascontiguousarray(c))
        size = index.ntotal * index.code_size if binary else len(faiss.serialize_index(index))
        first = (lambda q, r, ix=index: ix.search(np.packbits(q > mean, axis=1), r)) if binary else index.search
        out[name] = (TwoStage(first, store, k).search, True, size + 8 * n, time.perf_counter() - t)  # + ids, as pq4
    return out


def measure(gal: Gallery, path: Path, o: dict) -> tuple[list, dict]:
    """Rows of (candidate, depth): resident bytes, recall@10 and p50 / ratio to flat per round."""
    k, depths = int(o["k"]), list(o["depths"])
    q = gal.queries(int(o["queries"]))
    truth, stats = exact_top(path, q, k)
    cands = build(path, gal, k, int(o["seed"]))
    rows = []
    for name, (search, deep, size, build_s) in cands.items():
        for r in (depths if deep else [None]):
            got = [search(q[i:i + 1], r) for i in range(len(q))]
            rec = float(np.mean([len(set(g.tolist()) & set(t.tolist())) / k for g, t in zip(got, truth)]))
            rows.append({"n": gal.n, "gallery": gal.kind, "candidate": name, "depth": r, "recall_at_10": round(rec, 4),
                         "resident_mb": round(size / 2**20, 2), "bytes_per_photo": round(size / gal.n, 1),
                         "build_s": round(build_s, 1), "p50_ms_rounds": [], "ratio_rounds": [],
                         "wall_p50_ms_rounds": []})
    timed = q[:int(o["timed"])]
    for _ in range(int(o["rounds"])):
        p50 = {}
        for row in rows:
            search = cands[row["candidate"]][0]
            cpu, wall = [], []
            for i in range(len(timed)):
                t, c = time.perf_counter(), time.thread_time()
                search(timed[i:i + 1], row["depth"])
                cpu.append((time.thread_time() - c) * 1e3)
                wall.append((time.perf_counter() - t) * 1e3)
            p50[id(row)] = (float(np.median(cpu)), float(np.median(wall)))
        flat = next(p50[id(r)][0] for r in rows if r["candidate"] == "flat")
        for row in rows:
            row["p50_ms_rounds"].append(round(p50[id(row)][0], 4))
            row["wall_p50_ms_rounds"].append(round(p50[id(row)][1], 4))
            row["ratio_rounds"].append(round(p50[id(row)][0] / flat, 4))
    for row in rows:
        for key in ("p50_ms", "wall_p50_ms", "ratio"):
            row[key if key != "ratio" else "ratio_to_flat"] = round(float(np.median(row[key + "_rounds"])), 4)
    return rows, stats


PEAK = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("runner", sys.argv[1]); runner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runner)
import numpy as np, faiss
g = json.loads(sys.argv[2])
out = {"bare": runner.memory_status()}
if g.get("dtype"):
    t = time.perf_counter()
    sc = runner.Scorer("faiss", g, 10, int(sys.argv[3]))
    out["build_s"] = round(time.perf_counter() - t, 2)
    q = np.random.default_rng(0).standard_normal((50, int(sys.argv[3])), dtype=np.float32)
    for e in q: sc.search(e)
    out["bytes"] = sc.bytes()
    out["pq_m"] = int(sc.two.base.M) if sc.two is not None else None
    out["depth"] = sc.depth or None
out["memory"] = runner.memory_status()
print(json.dumps(out))
"""


def process_peak(path: Path, n: int, dim: int) -> list:
    """Whole-process peak (VmHWM) of the standalone runner file holding the gallery and searching it
    (numpy + faiss, no model runtime), beside the same process holding nothing."""
    out = []
    for g in ({}, {"dtype": "int8", "rerank": 4}, {"dtype": "pq4"}):  # pq4: the runner's defaults
        spec = dict(g, n=n, file=str(path))
        res = subprocess.run([sys.executable, "-c", PEAK, str(RUNNER), json.dumps(spec), str(dim)],
                             capture_output=True, text=True, timeout=1800, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if res.returncode:
            raise RuntimeError(f"peak-memory process failed: {res.stderr.strip().splitlines()[-1:]}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        out.append({"n": n, "gallery": g.get("dtype", "none (numpy + faiss imported)"), "depth": r.get("depth"),
                    "pq_m": r.get("pq_m"),
                    "peak_mb": r["memory"]["peak_mb"], "bytes_mb": round(r.get("bytes", 0) / 2**20, 2),
                    "build_s": r.get("build_s")})
    return out


def markdown(res: dict) -> str:
    m, o = res["meta"], res["options"]
    lines = [f"# Two-stage gallery scans vs faiss flat, D = {o['dim']}, 1 thread", "",
             f"- command: `{m['command']}`", f"- date: {m['date']}",
             f"- machine: {m['machine']}, shared with other jobs",
             f"- load (1-min load average on this machine's {os.cpu_count()} cores, at each gallery's start): "
             + ", ".join(f"N={x['n']} {x['gallery']} {x['load']}" for x in res["load"]),
             f"- timings: the search thread's CPU time (time.thread_time: a search preempted by the machine's "
             f"other processes does not count their time), p50 over {o['timed']} queries per round, median over "
             f"{o['rounds']} rounds; ratio = p50 / IndexFlatIP's p50 in the same round (compare ratios, not ms; "
             "memory-bandwidth contention from the other processes still counts); wall-clock p50s are in the "
             ".json (`wall_p50_ms`); two-stage rows include the re-rank of R rows read by pread from the fp32 .npy",
             f"- recall@10 over {o['queries']} queries against exact fp32 search of the same rows; "
             "resident = the index's own bytes (codes, codebooks) and an id map of 8 B a photo (what takes deletions), "
             "the re-rank rows stay on disk",
             "- not measured: a Matryoshka prefix (it needs a student trained for it; an untrained prefix is a "
             "random projection) and the student's own image embeddings (the script has no such gallery: no "
             "trained student was at hand)", "",
             "Galleries (cosine statistics: random pairs of rows, a query to its 1st / 10th / 100th neighbour):", ""]
    for g, s in res["galleries"].items():
        lines.append(f"- `{g}`: pairs {s['pair_cos_mean']}, query top-1 {s['query_top1_cos']}, top-10 "
                     f"{s['query_top10_cos']}, top-100 {s['query_top100_cos']} (at N={s['n']})")
    gals = list(dict.fromkeys(r["gallery"] for r in res["rows"]))
    for n in dict.fromkeys(r["n"] for r in res["rows"]):
        lines += ["", f"## N = {n:,}", "",
                  "| candidate | R | resident MB | "
                  + " | ".join(f"{g}: CPU p50 ms (x flat) | {g}: recall@10" for g in gals) + " |",
                  "|---|--:|--:|" + "--:|--:|" * len(gals)]
        keys = dict.fromkeys((r["candidate"], r["depth"]) for r in res["rows"] if r["n"] == n)
        for cand, depth in keys:
            by = {r["gallery"]: r for r in res["rows"] if r["n"] == n and (r["candidate"], r["depth"]) == (cand, depth)}
            mb = next(iter(by.values()))["resident_mb"]
            cells = [f"{by[g]['p50_ms']:.3f} ({by[g]['ratio_to_flat']:.3f}x) | {by[g]['recall_at_10']:.3f}"
                     if g in by else "- | -" for g in gals]
            lines.append(f"| {cand} | {depth or '-'} | {mb:.1f} | " + " | ".join(cells) + " |")
    if res.get("process_peak"):
        lines += ["", "Whole-process peak (VmHWM) of the standalone runner file building the gallery and searching it "
                  "50 times (numpy + faiss imported; no model runtime); pq4 with the runner's defaults:", "",
                  "| N | gallery | pq_m | R | peak MB | gallery bytes MB | build s |", "|--:|---|--:|--:|--:|--:|--:|"]
        for p in res["process_peak"]:
            lines.append(f"| {p['n']:,} | {p['gallery']} | {p.get('pq_m') or '-'} | {p['depth'] or '-'} | "
                         f"{p['peak_mb']:.1f} | "
                         f"{p['bytes_mb']:.1f} | {p['build_s'] if p['build_s'] is not None else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from mcad.io import atomic_write_text, machine, now_iso, versions, write_json

    argv = list(sys.argv[1:] if argv is None else argv)
    o = parse_overrides(argv, OPTIONS, types=TYPES).config
    if int(o["k"]) > min(o["depths"]) or int(o["timed"]) > int(o["queries"]):
        raise ValueError(f"depths={o['depths']}, timed={o['timed']}: need every depth >= k ({o['k']}) "
                         "and timed <= queries")
    res = {"meta": {"command": "python benchmarks/studies/two_stage_scan.py " + " ".join(argv), "date": now_iso(),
                    "machine": machine(), "versions": versions()},
           "options": o, "galleries": {}, "load": [], "rows": [], "process_peak": []}
    with tempfile.TemporaryDirectory(prefix="mcad-two-stage-") as tmp:
        for n in o["sizes"]:
            path = None
            for kind in o["galleries"]:
                gal = Gallery(kind, int(n), int(o["dim"]), int(o["seed"]), int(o["themes"]), int(o["event"]))
                path = write_rows(gal, Path(tmp) / f"{kind}-{n}.npy")
                res["load"].append({"n": int(n), "gallery": kind, "load": round(os.getloadavg()[0], 1)})
                rows, stats = measure(gal, path, o)
                res["rows"] += rows
                res["galleries"].setdefault(kind, dict(stats, n=int(n)))
                print(markdown(res).split("\n## ")[-1], flush=True)
                if kind != o["galleries"][-1]:
                    path.unlink()
            res["process_peak"] += process_peak(path, int(n), int(o["dim"]))
            path.unlink()
    md = markdown(res)
    print(md)
    if str(o["results"]).lower() != "none":
        out = Path(o["results"])
        write_json(out / "two_stage_scan.json", res)
        atomic_write_text(out / "two_stage_scan.md", md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
