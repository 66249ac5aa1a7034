"""What the scan of a shipped search program costs in each runtime, beside faiss's exact flat scan, in
one process, one thread: the floor under issue 14's "search program <= 1.5x its encoder + scan".

  python benchmarks/studies/scan_forms.py [rows=100000] [dims=64,256] [runs=40] [results=benchmarks/results]

Each program takes a query embedding q [1, D] and a gallery as runtime inputs and returns the
top-10 (scores, ids), built by the exporter's own builders in the form the exporter makes for a
run-time gallery (export.programs.SCANS; ExecuTorch's and LiteRT's only with any_gallery_search=1): ExecuTorch XNNPACK scores gallery [N, D] @ q^T (one fully connected layer
over the gallery rows, q as its one-column weight), LiteRT q @ gallery^T (a fully connected layer
whose weight is the gallery, given at run time, so the runtime repacks it each call), ONNX Runtime
q @ gallery with the gallery given as columns [D, N] (a plain GEMM). The ids of every program are
checked against the exact top-10 before anything is timed.
Writes scan_forms.{json,md} to `results` (none: only print)."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mcad.config import parse_overrides

OPTIONS = {"rows": 100_000, "dims": [64, 256], "runs": 40, "results": "benchmarks/results", "k": 10}
TYPES = {"dims": list[int]}


class Scan(torch.nn.Module):
    """The search program's scan and top-k (export.programs.Search without the text encoder)."""

    def __init__(self, scan: str, k: int):
        super().__init__()
        from mcad.export.programs import Search

        self.search = Search(torch.nn.Identity(), k=k, scan=scan)

    def forward(self, q, gallery):
        return self.search(q, gallery)


def build(runtime: str, dim: int, k: int, folder: Path):
    """(path, call(q, gallery) -> ids) of the runtime's scan program."""
    from mcad.export import builders

    ex = (torch.randn(1, dim), torch.nn.functional.normalize(torch.randn(64, dim), dim=-1))
    path = folder / f"scan{dim}.{runtime}"
    if runtime == "executorch":
        from torch.export import Dim

        builders.build_xnnpack(Scan("rows", k).eval(), ex, path, dynamic_shapes=({}, {0: Dim("n", min=k, max=10**6)}),
                               alloc_inputs=False)
        from executorch.runtime import Runtime  # in process: open_artifact's worker would time its IPC too

        method = Runtime.get().load_program(path).load_method("forward")
        return lambda q, g, gt=None: method.execute([torch.from_numpy(q), torch.from_numpy(g)])[1].numpy()
    if runtime == "onnxruntime":
        from torch.export import Dim

        builders.build_onnx(Scan("columns", k).eval(), (ex[0], ex[1].T.contiguous()), path, ["q", "gallery"],
                            ["scores", "ids"], dynamic_shapes=({}, {1: Dim("n", min=k, max=10**6)}))
    else:
        builders.build_tflite(Scan("rows-t", k).eval(), ex, path, ["q", "gallery"])  # traced at 64 rows, resized
    from mcad.runtimes import open_artifact  # the project's one way to open an artifact

    session = open_artifact(path, runtime, threads=1, names=["q", "gallery"])
    ids = next(i for i, o in enumerate(session.outputs) if "int" in o["dtype"])
    if runtime == "onnxruntime":  # the gallery as the program takes it, laid out once (not per query)
        return lambda q, g, gt=None: session.run([q, gt if gt is not None else g.T.copy()])[ids]
    return lambda q, g, gt=None: session.run([q, g])[ids]


class BoundScan(torch.nn.Module):
    """The bound scan the exporter makes (export.bound.gallery_scan) and the top-k."""

    def __init__(self, scan: torch.nn.Module, k: int):
        super().__init__()
        self.scan, self.k = scan, k

    def forward(self, q):
        v, i = torch.topk(self.scan(q), self.k, dim=-1)
        return v, i


BOUND = ("executorch-int8", "executorch-fp32", "litert-fp32")


def build_bound(form: str, g: np.ndarray, k: int, folder: Path):
    """(call(q) -> ids) of a program with the gallery g bound in: ExecuTorch XNNPACK fp32, or int8
    (weights per-row symmetric int8, the query quantized per call: XNNPACK's dynamic-quantized fully
    connected layer, the PT2E dynamic scheme), LiteRT fp32."""
    from mcad.export import builders

    from mcad.export.bound import gallery_scan

    m = BoundScan(gallery_scan(g, "int8" if form == "executorch-int8" else "fp32"), k)
    m.training = False  # the wrapper only: a converted PT2E graph refuses .eval()
    ex = (torch.zeros(1, g.shape[1]),)
    path = folder / f"bound{g.shape[1]}.{form}"
    if form.startswith("executorch"):
        builders.build_xnnpack(m, ex, path)
        from executorch.runtime import Runtime

        method = Runtime.get().load_program(path).load_method("forward")
        return lambda q: method.execute([torch.from_numpy(q)])[1].numpy()
    builders.build_tflite(m, ex, path, ["q"])
    from mcad.runtimes import open_artifact

    session = open_artifact(path, "litert", threads=1, names=["q"])
    ids = next(i for i, o in enumerate(session.outputs) if "int" in o["dtype"])
    return lambda q: session.run([q])[ids]


def p50_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs + 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[3:]) * 1000.0)


def measure(rows: int, dim: int, runs: int, k: int, folder: Path) -> dict:
    import faiss

    rng = np.random.default_rng(dim)
    g = rng.standard_normal((rows, dim), dtype=np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q = rng.standard_normal((1, dim), dtype=np.float32)
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    index = faiss.IndexFlatIP(dim)
    index.add(g)
    exact = index.search(q, k)[1][0]
    out = {"rows": rows, "dim": dim, "faiss_flat_ms": None, "programs": {}}
    calls = {rt: build(rt, dim, k, folder) for rt in ("executorch", "litert", "onnxruntime")}
    for rt, call in calls.items():
        ids = np.asarray(call(q, g)).reshape(-1)
        if not np.array_equal(np.sort(ids), np.sort(exact)):
            raise AssertionError(f"scan_forms: {rt} top-{k} at N={rows}, D={dim} differs from the exact scan: "
                                 f"{ids.tolist()} vs {exact.tolist()}")
    out["faiss_flat_ms"] = round(p50_ms(lambda: index.search(q, k), runs), 3)
    gt = np.ascontiguousarray(g.T)
    for rt, call in calls.items():
        ms = p50_ms(lambda: call(q, g, gt), runs)
        out["programs"][rt] = {"p50_ms": round(ms, 3), "x_faiss": round(ms / out["faiss_flat_ms"], 2)}
    del calls
    out["bound"] = {}
    for form in BOUND:  # one at a time: each holds its packed copy of the gallery
        call = build_bound(form, g, k, folder)
        ids = np.asarray(call(q)).reshape(-1)
        hits = len(set(ids.tolist()) & set(exact.tolist()))
        if form.endswith("fp32") and hits != k:
            raise AssertionError(f"scan_forms: bound {form} top-{k} at N={rows}, D={dim} differs from the exact scan")
        ms = p50_ms(lambda: call(q), runs)
        out["bound"][form] = {"p50_ms": round(ms, 3), "x_faiss": round(ms / out["faiss_flat_ms"], 2),
                              "recall_at_k": round(hits / k, 2)}
        del call
    return out


def markdown(res: dict) -> str:
    lines = [f"# Search-program scans vs faiss flat, {res['meta']['rows']:,} rows, 1 thread", "",
             f"- command: `{res['meta']['command']}`", f"- date: {res['meta']['date']}",
             f"- machine: {res['meta']['machine']}", "- " + __doc__.split("\n\n")[2].replace("\n", " "), "",
             "| D | faiss flat p50 ms | ExecuTorch XNNPACK | LiteRT | ONNX Runtime |", "|--:|--:|--:|--:|--:|"]
    for m in res["by_dim"]:
        cells = [f"{m['programs'][rt]['p50_ms']:.3f} ({m['programs'][rt]['x_faiss']:.2f}x)"
                 for rt in ("executorch", "litert", "onnxruntime")]
        lines.append(f"| {m['dim']} | {m['faiss_flat_ms']:.3f} | " + " | ".join(cells) + " |")
    if any(m.get("bound") for m in res["by_dim"]):
        lines += ["", "The gallery bound into the program instead (a weight the runtime packs once, at load; each query "
                  "feeds q only; " + " ".join(build_bound.__doc__.split(": ", 1)[1].split()) + "):", "",
                  "| D | faiss flat p50 ms | " + " | ".join(BOUND) + " |", "|--:|--:|" + "--:|" * len(BOUND)]
        for m in res["by_dim"]:
            cells = [f"{b['p50_ms']:.3f} ({b['x_faiss']:.2f}x, recall@10 {b['recall_at_k']:.2f})"
                     for b in (m["bound"][f] for f in BOUND)]
            lines.append(f"| {m['dim']} | {m['faiss_flat_ms']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from mcad.io import machine, now_iso, versions, write_json

    argv = list(sys.argv[1:] if argv is None else argv)
    kv = parse_overrides(argv, OPTIONS, types=TYPES).config
    with tempfile.TemporaryDirectory(prefix="mcad-scan-forms-") as tmp:
        by_dim = [measure(int(kv["rows"]), int(d), int(kv["runs"]), int(kv["k"]), Path(tmp)) for d in kv["dims"]]
    res = {"meta": {"command": "python benchmarks/studies/scan_forms.py " + " ".join(argv), "date": now_iso(),
                    "machine": machine(), "rows": int(kv["rows"]), "versions": versions()}, "by_dim": by_dim}
    md = markdown(res)
    print(md)
    if str(kv["results"]).lower() != "none":
        out = Path(kv["results"])
        write_json(out / "scan_forms.json", res)
        (out / "scan_forms.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
