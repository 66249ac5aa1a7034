"""On-device runner: times one search job in its real runtime and reports timings and memory as JSON.

Standalone on purpose: it imports only the standard library, numpy, the runtime it runs
(onnxruntime, ai_edge_litert / tflite_runtime, executorch) and, when asked, faiss and tokenizers.
It is pushed as a single file to a phone/board with Python, and runs here as
`python -m mcad.device.runner --spec spec.json` in a fresh process per job.

Modes (spec["mode"]):
- `search`: token ids of one text query -> ids of the top-k gallery images, split into
  tokenize (text -> ids), encode (ids -> embedding) and score_topk (embedding -> top-k ids over
  N precomputed gallery embeddings; faiss flat inner product or numpy). `search` = encode +
  score_topk (the method's search latency), `end_to_end` adds tokenize. With a search program
  artifact (spec["program"] == "search"), encode + score + top-k is one call (`search`).
- `image`: one image [1,3,S,S] -> embedding (gallery indexing cost per image).
- `bare`: import the same runtime and libraries, load nothing: the baseline that the model and
  gallery are measured against.
- `outputs`: run the model on given inputs (spec["inputs"]: an .npz with `in0`, `in1`, ...
  stacked over runs) and write what it returns (`out0`, ... to spec["outputs"]): what the
  artifact computes on this device, to compare with the host's runtimes or the golden outputs.

Memory: VmHWM (peak resident set) and VmRSS from /proc/self/status at the end (ru_maxrss where
/proc is missing). Output: one line `MCAD_RESULT {...json...}` on stdout (and --out FILE).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

RESULT_TAG = "MCAD_RESULT"
RUNNER_VERSION = 1
FAISS_THREADS = 1  # single-query flat search is fastest on one thread (and leaves cores to the encoder)


class RunnerError(RuntimeError):
    pass


# -- memory -----------------------------------------------------------------------------------
def memory_status() -> dict:
    """{'peak_mb', 'rss_mb', 'source'} of this process."""
    out: dict = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(rest.split()[0]) / 1024.0  # kB -> MB
    except OSError:
        pass
    if "VmHWM" in out:
        return {"peak_mb": round(out["VmHWM"], 2), "rss_mb": round(out.get("VmRSS", 0.0), 2),
                "source": "/proc/self/status VmHWM"}
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0
    return {"peak_mb": round(peak_mb, 2), "rss_mb": None, "source": "getrusage ru_maxrss"}


# -- statistics -------------------------------------------------------------------------------
def percentile(sorted_vals: list, q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an ascending list."""
    if not sorted_vals:
        return float("nan")
    pos = (len(sorted_vals) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def summarize_ms(values_ms: list) -> dict:
    v = sorted(values_ms)
    if not v:
        return {"n": 0}
    return {"n": len(v), "p50": round(percentile(v, 50), 4), "p90": round(percentile(v, 90), 4),
            "p99": round(percentile(v, 99), 4), "mean": round(sum(v) / len(v), 4),
            "min": round(v[0], 4), "max": round(v[-1], 4)}


# -- tokenizer (a copy of mcad.tokenizer's encode, so the runner stands alone) -------------------
class MiniTokenizer:
    def __init__(self, path: str, context_length: int | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        meta = data.pop("mcad", None)
        self.tok = HFTokenizer.from_str(json.dumps(data))
        self.tok.no_padding()
        self.tok.no_truncation()
        if meta is not None:
            self.context_length = int(context_length or meta["context_length"])
            self.sot_id, self.eot_id, self.pad_id = int(meta["sot_id"]), int(meta["eot_id"]), int(meta["pad_id"])
            kind = meta.get("kind", "bpe")
        else:  # a plain CLIP tokenizer.json
            vocab = self.tok.get_vocab()
            self.context_length = int(context_length or 77)
            self.sot_id, self.eot_id, self.pad_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"], 0
            kind = "clip"
        self.drop = {self.sot_id, self.eot_id} | ({self.pad_id} if kind == "bpe" else set())

    def encode(self, text: str):
        import numpy as np

        L = self.context_length
        out = np.full((1, L), self.pad_id, dtype=np.int64)
        body = [t for t in self.tok.encode(text, add_special_tokens=False).ids if t not in self.drop][: L - 2]
        out[0, 0] = self.sot_id
        out[0, 1:1 + len(body)] = body
        out[0, 1 + len(body)] = self.eot_id
        return out


# -- runtimes ---------------------------------------------------------------------------------
def import_runtime(runtime: str):
    if runtime == "onnxruntime":
        import onnxruntime

        return onnxruntime
    if runtime == "litert":
        try:
            from ai_edge_litert import interpreter
        except ImportError:
            try:
                from tflite_runtime import interpreter  # older name of the same interpreter
            except ImportError:
                raise RunnerError("litert: neither ai_edge_litert nor tflite_runtime is installed") from None
        return interpreter
    if runtime == "executorch":
        from executorch.runtime import Runtime  # imports torch (~350-400 MB resident)

        return Runtime
    raise RunnerError(f"unknown runtime {runtime!r} (onnxruntime, litert, executorch)")


class Model:
    """One artifact in its runtime: `run(list of numpy arrays) -> list of numpy arrays`, int8
    outputs dequantized (the same contract as the package's mcad.runtimes, kept here so the
    runner stands alone). `names`: the program's input names in the order inputs are given (a
    TFLite signature lists them alphabetically)."""

    def __init__(self, runtime: str, path: str, threads: int, names: list | None = None):
        import numpy as np

        self.np = np
        self.runtime = runtime
        mod = import_runtime(runtime)
        if not os.path.exists(path):
            raise RunnerError(f"{path}: no such model file")
        if runtime == "onnxruntime":
            so = mod.SessionOptions()
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
            so.execution_mode = mod.ExecutionMode.ORT_SEQUENTIAL
            self.sess = mod.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            self.in_names = [i.name for i in self.sess.get_inputs()]
            tmap = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
                    "tensor(float16)": np.float16, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
            self.in_dtypes = [tmap.get(i.type, np.float32) for i in self.sess.get_inputs()]
            self.in_shapes = [list(i.shape) for i in self.sess.get_inputs()]
        elif runtime == "litert":
            self.it = mod.Interpreter(model_path=path, num_threads=threads)
            self.it.allocate_tensors()
            self.ins = self.it.get_input_details()
            self.outs = self.it.get_output_details()
            sig = self.it.get_signature_list()
            if sig:  # the signature's order is the program's; tensor order may be another
                key = next(iter(sig))
                runner = self.it.get_signature_runner(key)
                by_name = runner.get_input_details()
                order = names if names and set(names) == set(sig[key]["inputs"]) else sig[key]["inputs"]
                self.ins = [by_name[n] for n in order]
                out_d = runner.get_output_details()
                self.outs = [out_d[n] for n in sig[key]["outputs"]]
                del runner  # it holds views into the interpreter, which would block resizing
            self.in_dtypes = [d["dtype"] for d in self.ins]
            self.in_shapes = [list(d["shape_signature"]) for d in self.ins]
            self._shapes = None
        else:
            try:  # XNNPACK's threadpool (the Python runtime has no per-program thread option)
                from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

                _unsafe_reset_threadpool(threads)
            except Exception:  # pragma: no cover - older wheels
                pass
            import torch

            torch.set_num_threads(threads)
            self.torch = torch
            program = mod.get().load_program(path)
            self.method = program.load_method("forward")
            if self.method is None:
                raise RunnerError(f"{path}: program has no 'forward' method")
            self.in_dtypes, self.in_shapes = [], []
            try:
                meta = self.method.metadata
                for i in range(meta.num_inputs()):
                    tm = meta.input_tensor_meta(i)
                    self.in_shapes.append(list(tm.sizes()))
                    self.in_dtypes.append({4: np.int64, 3: np.int32, 6: np.float32}.get(int(tm.dtype()), None))
            except Exception:
                pass

    def quantize(self, d: dict, x):
        np = self.np
        scale, zero = d.get("quantization", (0.0, 0))
        if scale and np.issubdtype(np.dtype(d["dtype"]), np.integer) and np.issubdtype(x.dtype, np.floating):
            info = np.iinfo(d["dtype"])
            return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(d["dtype"])
        return x

    def cast(self, i: int, x):
        dt = self.in_dtypes[i] if i < len(self.in_dtypes) else None
        return x if dt is None or x.dtype == dt else x.astype(dt)

    def bind(self, i: int, x) -> None:
        """Give input `i` once for every later `run` (pass None there): a search program's gallery
        is the same for every query, and copying 25-100 MB into the runtime per query (LiteRT's
        set_tensor) cost more than the search itself."""
        np = self.np
        x = self.cast(i, self.quantize(self.ins[i], x) if self.runtime == "litert" else x)
        self.bound = getattr(self, "bound", {})
        self.bound[i] = np.ascontiguousarray(x)
        if self.runtime == "executorch":
            self.bound[i] = self.torch.from_numpy(self.bound[i])
        self._shapes = None  # LiteRT: resized and set at the next run

    def bind_rows(self, i: int, n: int, dim: int, chunks, example: list, layout: str = "rows") -> None:
        """`bind` for a gallery of n x dim float32 rows that arrive in chunks: LiteRT gets them written
        straight into its own input buffer (a separate array first would double the peak by the
        gallery: 102 MB at 100k x 256); the others take one array in place (zero-copy inputs).
        `example`: the other inputs as a run will feed them (None at i). layout="columns": the
        program takes the gallery as [dim, n] (the manifest's notes.gallery_layout), written so."""
        np = self.np
        if layout not in ("rows", "columns"):
            raise RunnerError(f"gallery layout {layout!r}: expected rows or columns")
        if self.runtime != "litert" or layout == "columns":
            g = np.empty((n, dim) if layout == "rows" else (dim, n), dtype=np.float32)
            pos = 0
            for c in chunks:
                if layout == "rows":
                    g[pos:pos + len(c)] = c
                else:
                    g[:, pos:pos + len(c)] = c.T
                pos += len(c)
            return self.bind(i, g)
        shapes = [(n, dim) if j == i else tuple(x.shape) for j, x in enumerate(example)]
        for d, shp in zip(self.ins, shapes):
            self.it.resize_tensor_input(d["index"], list(shp), strict=False)
        self.it.allocate_tensors()
        view, pos = self.it.tensor(self.ins[i]["index"]), 0
        for c in chunks:
            view()[pos:pos + len(c)] = self.quantize(self.ins[i], c)
            pos += len(c)
        del view  # it holds the interpreter's buffer, which must not be held across invoke
        self.bound = getattr(self, "bound", {})
        self.bound[i] = _Dropped((n, dim), self.ins[i]["dtype"])
        self._shapes = shapes

    def run(self, inputs: list):
        np = self.np
        bound = getattr(self, "bound", {})
        fresh = [i for i, x in enumerate(inputs) if x is not None]
        if self.runtime == "litert":  # float values into an integer input: quantize with its scale
            inputs = [self.quantize(d, x) if x is not None else None for d, x in zip(self.ins, inputs)]
        inputs = [self.cast(i, x) if x is not None else bound[i] for i, x in enumerate(inputs)]
        if self.runtime == "onnxruntime":
            return self.sess.run(None, dict(zip(self.in_names, inputs)))
        if self.runtime == "litert":
            shapes = [tuple(x.shape) for x in inputs]
            if shapes != self._shapes:
                for d, x in zip(self.ins, inputs):
                    self.it.resize_tensor_input(d["index"], list(x.shape), strict=False)
                self.it.allocate_tensors()
                self._shapes = shapes
                fresh = range(len(inputs))  # allocate_tensors may move every input: set them all again
            for i in fresh:
                if i in bound and isinstance(bound[i], _Dropped):
                    raise RunnerError("a bound input was released after it was set; bind it again")
                self.it.set_tensor(self.ins[i]["index"], np.ascontiguousarray(inputs[i]))
                if i in bound:  # the interpreter holds its own copy now: release ours (memory)
                    bound[i] = _Dropped(bound[i].shape, bound[i].dtype)
            self.it.invoke()
            outs = []
            for d in self.outs:
                y = self.it.get_tensor(d["index"])
                scale, zero = d.get("quantization", (0.0, 0))
                if y.dtype in (np.int8, np.uint8, np.int16) and scale:
                    y = (y.astype(np.float32) - zero) * scale
                outs.append(y.copy())
            return outs
        res = self.method.execute([x if i in bound and not isinstance(x, np.ndarray)
                                   else self.torch.from_numpy(np.ascontiguousarray(x)) for i, x in enumerate(inputs)])
        return [np.array(r.numpy() if hasattr(r, "numpy") else r) for r in res]  # a copy: buffers are reused


class _Dropped:
    """A bound input the runtime holds a copy of (its shape and dtype for the resize check)."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype


# -- gallery and scoring ----------------------------------------------------------------------
def _npy_chunks(path: str, chunk_rows: int):
    """Rows of a 2-D float32 .npy in chunks, read with plain file reads (no mmap: mapped pages
    would count towards the resident set and blur the memory figure)."""
    import numpy as np

    with open(path, "rb") as f:
        shape, fortran, dtype = _npy_header(f)
        if len(shape) != 2 or fortran:
            raise RunnerError(f"{path}: gallery must be a C-ordered 2-D array, got shape {shape}")
        n, d = shape
        for start in range(0, n, chunk_rows):
            rows = min(chunk_rows, n - start)
            buf = np.frombuffer(f.read(rows * d * dtype.itemsize), dtype=dtype).reshape(rows, d)
            yield buf.astype(np.float32, copy=False)


def _npy_header(f):
    """(shape, fortran_order, dtype) of an open .npy, the file positioned at its data."""
    import numpy as np

    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(f)


def _random_chunks(n: int, d: int, seed: int, chunk_rows: int):
    """Unit vectors, float32 throughout (a float64 temporary would inflate the peak)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk_rows):
        rows = min(chunk_rows, n - start)
        x = rng.standard_normal((rows, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        yield x


GALLERY_DTYPES = ("fp32", "fp16", "int8", "pq4")
DEFAULT_DEPTH = 200  # pq4: rows re-ranked exactly per query (the gallery's `depth`): at least this many,
DEPTH_PER_ROWS = 1000  # and one per this many photos (a larger gallery has more near neighbours to pass)
CODE_BUDGET_MB = 40  # pq4: the finest code (pq_m = dim/2, dim/4, dim/8) whose codes fit this by default
PQ_TRAIN_ROWS = 4096  # pq4: rows the codebooks are trained on (what faiss's k-means samples for 16 centroids)


# rows per chunk when a gallery streams in: the chunk (and its temporaries) is part of the measured
# peak, so it is kept small (1 MB at 256-d); the values do not depend on it
CHUNK_ROWS = 1024


def gallery_chunks(gallery: dict, dim: int, chunk: int = CHUNK_ROWS):
    """The gallery's float32 rows, `chunk` at a time: its .npy file, or seeded random unit vectors."""
    if gallery.get("file"):
        return _npy_chunks(gallery["file"], chunk)
    return _random_chunks(int(gallery["n"]), dim, int(gallery.get("seed", 0)), chunk)


class Scorer:
    """The gallery and its top-k scan. `gallery`: {"n", "seed" | "file", "dtype": fp32|fp16|int8|pq4,
    "rerank": r, "depth": R, "pq_m": M, "code_mb": MB, "added": path}. fp32 is faiss's exact flat scan;
    fp16 and int8 are faiss scalar quantizers (int8: per-dimension ranges, faiss SQ8) holding 2 and 1
    bytes per dimension; with `rerank` r > 0 and the fp32 rows in `file`, the k * r best by the
    compressed codes are scored again exactly from rows read off the disk (not resident). pq4 is a
    two-stage scan (`TwoStage`): 4-bit PQ fast-scan codes of every row (M sub-quantizers, M / 2 bytes a
    row; by default the finest of dim/2, dim/4, dim/8 whose codes fit MB), then the R best (by default
    one per DEPTH_PER_ROWS photos, at least DEFAULT_DEPTH) re-ranked exactly from the fp32 rows in
    `file`; it alone takes photos added and removed on the device (`add`, `remove`)."""

    def __init__(self, kind: str, gallery: dict, k: int, dim: int):
        import numpy as np

        self.np, self.kind, self.k, self.dim = np, kind, k, dim
        n = int(gallery["n"])
        self.dtype = str(gallery.get("dtype") or "fp32")
        if self.dtype not in GALLERY_DTYPES:
            raise RunnerError(f"gallery dtype {self.dtype!r}: expected one of {', '.join(GALLERY_DTYPES)}")

        def chunks():
            return gallery_chunks(gallery, dim)

        self.file = gallery.get("file")
        self.rerank = int(gallery.get("rerank") or 0) if self.dtype != "fp32" else 0
        self.two, self.depth = None, 0
        if self.rerank and not self.file:
            raise RunnerError("gallery rerank needs the fp32 rows on disk (gallery.file)")
        if kind == "faiss":
            import faiss

            faiss.omp_set_num_threads(FAISS_THREADS)
            if self.dtype == "pq4":
                self.rerank, self.two = 0, TwoStage(gallery, k, dim, chunks)
                self.index, self.depth = self.two.index, self.two.depth
            elif self.dtype == "fp32":
                self.index = _flat_index(dim, n, chunks())
            else:
                self.index = _sq_index(self.dtype, dim, n, chunks)
            self.n = self.index.ntotal
        elif kind == "numpy":
            if self.dtype != "fp32":
                raise RunnerError("a compressed gallery is scanned by faiss (scorer=faiss)")
            self.g = np.empty((n, dim), dtype=np.float32)
            pos = 0
            for c in chunks():
                self.g[pos:pos + len(c)] = c
                pos += len(c)
            self.g = self.g[:pos]
            self.n = pos
        elif kind == "none":
            self.n = 0
        else:
            raise RunnerError(f"unknown scorer {kind!r} (faiss, numpy)")

    def bytes(self) -> int:
        """What the gallery holds in memory."""
        if self.two is not None:
            return self.two.bytes()
        if self.kind == "faiss":
            return int(self.index.codes.size()) if self.dtype != "fp32" else int(self.n * self.dim * 4)
        return int(getattr(self, "g", self.np.zeros(0)).nbytes)

    def search(self, q):
        np = self.np
        q = np.ascontiguousarray(q.reshape(1, -1), dtype=np.float32)
        if self.two is not None:
            return self.two.search(q)
        if self.kind == "faiss":
            _, idx = self.index.search(q, self.k * max(1, self.rerank))
            return self._exact(q[0], idx[0]) if self.rerank else idx[0]
        scores = self.g @ q[0]
        k = min(self.k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        return top[np.argsort(-scores[top])]

    def _exact(self, q, cand):
        """Re-rank a shortlist by the fp32 rows, read from the gallery file row by row."""
        np = self.np
        cand = cand[cand >= 0]
        rows = _npy_rows(self.file, cand, self.dim)
        order = np.argsort(-(rows @ q), kind="stable")[:self.k]
        return cand[order]

    def add(self, rows):
        """Add photos' embeddings [m, dim]; returns their ids (the next free row numbers)."""
        ids = self._updatable().add(rows)
        self.n = self.index.ntotal
        return ids

    def remove(self, ids) -> int:
        """Remove photos by id; returns how many were in the gallery."""
        n = self._updatable().remove(ids)
        self.n = self.index.ntotal
        return n

    def _updatable(self):
        if self.two is None:
            raise RunnerError(f"gallery dtype {self.dtype!r} is built once; a gallery that takes added and removed "
                              "photos is dtype=pq4 (scorer=faiss)")
        return self.two


class RowStore:
    """The exact fp32 rows of a two-stage gallery, on disk: the gallery's .npy (read-only) and the rows
    added on the device, appended to a file of their own (`added`, else an anonymous temporary file).
    Rows are read with pread, so none is mapped or resident; row ids run on from the .npy's rows."""

    def __init__(self, path: str, dim: int, added: str | None = None):
        import tempfile

        self.f = open(path, "rb")
        shape, fortran, dtype = _npy_header(self.f)
        if len(shape) != 2 or fortran or shape[1] != dim or dtype.str != "<f4":
            raise RunnerError(f"{path}: the re-rank rows must be a C-ordered float32 [N, {dim}] .npy, "
                              f"got {dtype.str} {shape}")
        self.dim, self.start, self.n_base = dim, self.f.tell(), int(shape[0])
        self.extra = open(added, "w+b") if added else tempfile.TemporaryFile()
        self.n = self.n_base

    def append(self, rows):
        import numpy as np

        data = rows.tobytes()
        if os.pwrite(self.extra.fileno(), data, (self.n - self.n_base) * self.dim * 4) != len(data):
            raise RunnerError(f"{self.extra.name}: short write of added rows (disk full?)")
        ids = np.arange(self.n, self.n + len(rows), dtype=np.int64)
        self.n += len(rows)
        return ids

    def read(self, ids):
        """Rows `ids` as float32 [len(ids), dim], one pread each into one buffer."""
        import numpy as np

        size = self.dim * 4
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        view = memoryview(out).cast("B")
        base, extra = self.f.fileno(), self.extra.fileno()
        for j, r in enumerate(ids.tolist()):
            fd, off = (base, self.start + r * size) if r < self.n_base else (extra, (r - self.n_base) * size)
            if os.preadv(fd, [view[j * size:(j + 1) * size]], off) != size:
                raise RunnerError(f"row {r} is past the end of the gallery's rows on disk")
        return out


class TwoStage:
    """Two-stage search: faiss's 4-bit PQ fast-scan codes of every row (SIMD over packed nibbles, the
    rows never decoded to float), the `depth` best by them re-ranked exactly from the fp32 rows on
    disk (`RowStore`). The codebooks are trained here, by faiss's k-means on rows of the gallery itself;
    photos added later are encoded with them. faiss's IndexIDMap keeps the photo ids through removals."""

    def __init__(self, gallery: dict, k: int, dim: int, chunks):
        import faiss
        import numpy as np

        self.np, self.faiss, self.k, self.dim = np, faiss, k, dim
        if not gallery.get("file"):
            raise RunnerError("gallery dtype pq4 re-ranks from the fp32 rows on disk: give gallery.file")
        self.store = RowStore(gallery["file"], dim, gallery.get("added"))
        n = self.store.n_base
        self.depth = int(gallery.get("depth") or max(DEFAULT_DEPTH, n // DEPTH_PER_ROWS))
        m = int(gallery.get("pq_m") or _default_pq_m(n, dim, float(gallery.get("code_mb") or CODE_BUDGET_MB)))
        if self.depth < k or m < 1 or dim % m:
            raise RunnerError(f"gallery depth={self.depth}, pq_m={m}: need depth >= k ({k}) and pq_m dividing "
                              f"the embedding size {dim}")
        base = faiss.IndexPQFastScan(dim, m, 4, faiss.METRIC_INNER_PRODUCT)
        base.train(_sample_rows(chunks(), n, dim))
        self.base, self.index = base, faiss.IndexIDMap(base)
        _reserve(self.index, base, n)
        pos = 0
        for c in chunks():
            self.index.add_with_ids(np.ascontiguousarray(c), np.arange(pos, pos + len(c), dtype=np.int64))
            pos += len(c)
        if pos != self.store.n_base:
            raise RunnerError(f"{gallery['file']}: {pos} rows streamed, its header says {self.store.n_base}")

    def search(self, q):
        """Top-k ids of one query [1, dim] (float32)."""
        np = self.np
        _, idx = self.index.search(q, min(self.depth, max(1, self.index.ntotal)))
        cand = np.sort(idx[0][idx[0] >= 0])  # in file order: the reads walk the file forwards
        scores = self.store.read(cand) @ q[0]
        top = np.argpartition(-scores, self.k - 1)[:self.k] if len(cand) > self.k else np.arange(len(cand))
        return cand[top[np.lexsort((cand[top], -scores[top]))]]

    def add(self, rows):
        np = self.np
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.dim or not np.issubdtype(rows.dtype, np.floating):
            raise RunnerError(f"rows to add: expected float [m, {self.dim}], got {rows.dtype} {rows.shape}")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        ids = self.store.append(rows)
        self.index.add_with_ids(rows, ids)
        return ids

    def remove(self, ids) -> int:
        np = self.np
        ids = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        n = int(self.index.remove_ids(self.faiss.IDSelectorBatch(ids))) if len(ids) else 0
        _clear_fastscan_tail(self.base)
        return n

    def bytes(self) -> int:
        """Codes (packed in blocks of 32 rows), codebooks and the id map held in memory."""
        return int(self.base.codes.nbytes() + self.base.pq.centroids.size() * 4 + self.index.id_map.size() * 8)


def _default_pq_m(n: int, dim: int, budget_mb: float) -> int:
    """Sub-quantizers of 4 bits: dim/2, else dim/4, else dim/8, the first whose n codes fit budget_mb."""
    for m in (dim // 2, dim // 4):
        if m >= 1 and dim % m == 0 and n * m / 2 <= budget_mb * 2**20:
            return m
    return max(1, dim // 8)


def _reserve(index, base, n: int) -> None:
    """Size an IndexIDMap over a fast-scan index for n rows before they are added, so that adding them
    grows nothing: faiss grows both by doubling, which copies (the old and new buffers together would
    be the build's peak). The codes are zeroed, as add() leaves them where it allocates: it packs each
    new code onto the slot's bits."""
    import faiss

    if n <= 0:
        return
    size = -(-n // base.bbs) * base.bbs * base.M2 // 2
    base.codes.resize(size)
    faiss.rev_swig_ptr(base.codes.get(), size)[:] = 0
    index.id_map.resize(n)
    index.id_map.resize(0)  # a std::vector keeps its capacity


def _sample_rows(chunks, n: int, dim: int):
    """PQ_TRAIN_ROWS rows evenly spaced over the gallery (photos in the order they were taken: every part of
    it), collected into one buffer as the rows stream by (no random generator, no second copy)."""
    import numpy as np

    pick = np.linspace(0, n - 1, num=min(n, PQ_TRAIN_ROWS)).round().astype(np.int64)
    out, got, pos = np.empty((len(pick), dim), dtype=np.float32), 0, 0
    for c in chunks:
        sel = pick[(pick >= pos) & (pick < pos + len(c))] - pos
        out[got:got + len(sel)] = c[sel]
        got, pos = got + len(sel), pos + len(c)
    return out[:got]


def _clear_fastscan_tail(index) -> None:
    """Zero the codes past ntotal in a fast-scan index's last block. faiss's IndexFastScan.remove_ids
    compacts the codes but leaves the moved-out ones in the last block's free slots, and its add()
    packs new codes over those slots without clearing them, so a row added after a removal would be
    scored from a corrupted code. Code 0 written by the index's own code packer clears a slot."""
    import faiss
    import numpy as np

    if index.ntotal2 == index.ntotal:
        return
    packer = index.get_CodePacker()
    zero = np.zeros(packer.code_size, dtype=np.uint8)
    codes = faiss.rev_swig_ptr(index.codes.get(), index.codes.size())
    last = codes[(index.ntotal // packer.nvec) * packer.block_size:]  # the block holding the free slots
    for j in range(index.ntotal % packer.nvec, packer.nvec):
        packer.pack_1_c(faiss.swig_ptr(zero), j, faiss.swig_ptr(last))


def _flat_index(dim: int, n: int, chunks):
    """faiss IndexFlatIP filled in place: add() in chunks grows a std::vector by doubling (a transient
    copy that would inflate the peak)."""
    import faiss

    index = faiss.IndexFlatIP(dim)
    try:
        index.codes.resize(n * dim * 4)
        xb = faiss.rev_swig_ptr(index.get_xb(), n * dim).reshape(n, dim)
        pos = 0
        for c in chunks:
            xb[pos:pos + len(c)] = c
            pos += len(c)
        index.ntotal = pos
    except AttributeError:  # older faiss: plain add
        import numpy as np

        index.reset()
        for c in chunks:
            index.add(np.ascontiguousarray(c))
    return index


def _sq_index(dtype: str, dim: int, n: int, chunks):
    """faiss IndexScalarQuantizer (fp16, or 8 bits per dimension over its range) built from the
    gallery streamed twice: the per-dimension min / max of every row first (what faiss's train with
    RS_minmax computes, without holding the rows), then the codes written in place."""
    import faiss
    import numpy as np

    qt = {"fp16": faiss.ScalarQuantizer.QT_fp16, "int8": faiss.ScalarQuantizer.QT_8bit}[dtype]
    index = faiss.IndexScalarQuantizer(dim, qt, faiss.METRIC_INNER_PRODUCT)
    if dtype == "int8":
        lo, hi = np.full(dim, np.inf, dtype=np.float32), np.full(dim, -np.inf, dtype=np.float32)
        for c in chunks():
            lo, hi = np.minimum(lo, c.min(0)), np.maximum(hi, c.max(0))
        faiss.copy_array_to_vector(np.concatenate([lo, hi - lo]).astype(np.float32), index.sq.trained)
    index.is_trained = True
    cs = int(index.code_size)
    index.codes.resize(n * cs)
    codes = faiss.rev_swig_ptr(index.codes.data(), n * cs).reshape(n, cs)
    pos = 0
    for c in chunks():
        codes[pos:pos + len(c)] = index.sa_encode(np.ascontiguousarray(c, dtype=np.float32))
        pos += len(c)
    index.ntotal = pos
    return index


def _npy_rows(path: str, rows, dim: int):
    """Rows of a C-ordered float32 [N, dim] .npy, read with pread (nothing mapped or cached)."""
    import numpy as np

    with open(path, "rb") as f:
        _npy_header(f)
        start = f.tell()
        size = dim * 4
        out = np.empty((len(rows), dim), dtype=np.float32)
        for j, r in enumerate(rows.tolist()):
            out[j] = np.frombuffer(os.pread(f.fileno(), size, start + r * size), dtype=np.float32)
    return out


# -- the job ----------------------------------------------------------------------------------
def run_outputs(model: Model, inputs_file: str, outputs_file: str) -> dict:
    """Run `in0`, `in1`, ... of an .npz (each stacked over runs) and write `out0`, ... likewise."""
    import numpy as np

    with np.load(inputs_file) as z:
        ins = [z[f"in{j}"] for j in range(len(z.files))]
    runs = len(ins[0]) if ins else 0
    outs = [model.run([x[r] for x in ins]) for r in range(runs)]
    arrays = {f"out{j}": np.stack([o[j] for o in outs]) for j in range(len(outs[0]))} if outs else {}
    tmp = outputs_file + ".tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, outputs_file)
    return {"runs": runs, "outputs": os.path.basename(outputs_file)}


def _pin(spec: dict) -> list | None:
    cpus = spec.get("cpus")
    if cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, set(int(c) for c in cpus))
        except OSError as e:
            raise RunnerError(f"cannot pin to cpus {cpus}: {e}") from None
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return None


def _loop(spec: dict, step) -> tuple[dict, float]:
    """Warm-up, then runs until both min_runs and min_time_s are reached (or a max is hit)."""
    for i in range(int(spec.get("warmup", 10))):
        step(i, None)
    min_runs, max_runs = int(spec.get("min_runs", 100)), int(spec.get("max_runs", 2000))
    min_t, max_t = float(spec.get("min_time_s", 1.0)), float(spec.get("max_time_s", 30.0))
    times: dict = {}
    t0 = time.perf_counter()
    i = 0
    while True:
        step(i, times)
        i += 1
        el = time.perf_counter() - t0
        if i >= max_runs or el >= max_t or (i >= min_runs and el >= min_t):
            break
    return times, time.perf_counter() - t0


def run_job(spec: dict) -> dict:
    """One job: the mode's function, in a process that imports what every mode of this runtime imports
    (so a bare process is the same process less the model and the gallery)."""
    mode = spec.get("mode", "search")
    if mode not in MODES:
        raise RunnerError(f"unknown mode {mode!r} ({', '.join(MODES)})")
    runtime = spec["runtime"]
    cpus = _pin(spec)
    t_start = time.perf_counter()
    program = spec.get("program", "encoder")
    import_runtime(runtime)
    if mode in ("search", "bare") and spec.get("scorer", "faiss") == "faiss" and program != "search":
        import faiss  # noqa: F401
    if spec.get("tokenizer") and mode in ("search", "bare"):
        import tokenizers  # noqa: F401
    result: dict = {"mode": mode, "runtime": runtime, "threads": int(spec.get("threads", 1)), "cpus": cpus,
                    "runner": "python", "runner_version": RUNNER_VERSION,
                    "python": platform.python_version(), "machine": platform.machine()}
    if mode == "bare":
        result["import_s"] = round(time.perf_counter() - t_start, 3)
        result["memory"] = memory_status()
        return result
    t = time.perf_counter()
    model = Model(runtime, spec["model"], result["threads"], spec.get("input_names"))
    result["load_model_s"] = round(time.perf_counter() - t, 3)
    if mode == "outputs":
        return dict(result, **run_outputs(model, spec["inputs"], spec["outputs"]), memory=memory_status())
    times, elapsed = MODES[mode](spec, model, result)
    return _finish(spec, result, times, elapsed)


def _job_image(spec: dict, model: Model, result: dict) -> tuple[dict, float]:
    """Image encoder latency on one seeded random image of the model's size."""
    import numpy as np

    size = int(spec.get("image_size", 224))
    pix = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    result["embed_dim"] = int(model.run([pix])[0].shape[-1])

    def step(i, times):
        t0 = time.perf_counter()
        model.run([pix])
        if times is not None:
            times.setdefault("encode", []).append((time.perf_counter() - t0) * 1e3)

    return _loop(spec, step)


def _query_ids(spec: dict):
    """(token ids [Q, L], tokenizer or None, texts, whether the tokenizer's ids feed the encoder). When
    the tokenizer is the model's own its ids feed the encoder; otherwise (a peer with another
    vocabulary) tokenize is timed on its own and the encoder gets the given ids."""
    import numpy as np

    ids_all = np.load(spec["ids"]) if spec.get("ids") else None
    tok = MiniTokenizer(spec["tokenizer"], spec.get("context_length")) if spec.get("tokenizer") else None
    texts = list(spec.get("texts") or ["a photo of a dog"])
    if ids_all is None and tok is None:
        raise RunnerError("search job needs token ids (spec.ids) or a tokenizer (spec.tokenizer)")
    use_tok_ids = tok is not None and bool(spec.get("tokenizer_is_model_tokenizer", ids_all is None))
    if ids_all is None:
        ids_all = np.concatenate([tok.encode(t) for t in texts])
    return ids_all.astype(np.int64, copy=False), tok, texts, use_tok_ids


def _embed_dim(spec: dict, model: Model, ids_all, program: str, bound: dict | None) -> int:
    import numpy as np

    if bound:
        return int(bound["dim"])
    if spec.get("embed_dim"):
        return int(spec["embed_dim"])
    if program == "search":  # the gallery input's last dimension
        shp = model.in_shapes[1] if len(model.in_shapes) > 1 else []
        d_at = 0 if spec["gallery"].get("layout") == "columns" else -1
        if not shp or not isinstance(shp[d_at], (int, np.integer)) or int(shp[d_at]) <= 0:
            raise RunnerError("search program: embedding size unknown (give spec.embed_dim)")
        return int(shp[d_at])
    return int(model.run([ids_all[:1]])[0].shape[-1])


def _gallery(spec: dict, model: Model, ids_all, dim: int, program: str, bound: dict | None, result: dict):
    """Give the gallery to whoever scores it: nothing for a program holding one (bound at export),
    once to a search program taking it as an input, else a Scorer of the encoder's embeddings."""
    k = int(spec.get("k", 10))
    t = time.perf_counter()
    gsource = "file" if spec["gallery"].get("file") else "random unit vectors"
    scorer = None
    if bound:
        if int(bound["n"]) != int(spec["gallery"]["n"]):
            raise RunnerError(f"search program holds a gallery of {bound['n']} rows, the job asks for {spec['gallery']['n']}")
        result["gallery"] = {"n": int(bound["n"]), "dim": dim, "source": "bound in the program",
                             "dtype": bound.get("dtype", "fp32"), "rerank": 0, "bytes": int(bound.get("bytes") or 0)}
    elif program == "search":
        n = int(spec["gallery"]["n"])
        model.bind_rows(1, n, dim, gallery_chunks(spec["gallery"], dim), [ids_all[:1], None],
                        layout=str(spec["gallery"].get("layout") or "rows"))
        result["gallery"] = {"n": n, "dim": dim, "source": gsource, "dtype": "fp32", "rerank": 0, "bytes": n * dim * 4}
    else:
        scorer = Scorer(spec.get("scorer", "faiss"), spec["gallery"], k, dim)
        result["gallery"] = {"n": scorer.n, "dim": dim, "source": gsource, "dtype": scorer.dtype,
                             "rerank": scorer.rerank, "depth": scorer.depth, "bytes": scorer.bytes()}
    result["build_gallery_s"] = round(time.perf_counter() - t, 3)
    result["scorer"] = "search program" if program == "search" else spec.get("scorer", "faiss")
    return scorer


def _job_search(spec: dict, model: Model, result: dict) -> tuple[dict, float]:
    """Search latency: one query's token ids (or text) -> the top-k gallery ids, split into its stages."""
    import numpy as np

    program = spec.get("program", "encoder")
    ids_all, tok, texts, use_tok_ids = _query_ids(spec)
    bound = spec["gallery"].get("bound") if program == "search" else None
    dim = _embed_dim(spec, model, ids_all, program, bound)
    scorer = _gallery(spec, model, ids_all, dim, program, bound, result)
    last: dict = {}

    def step(i, times):
        t0 = time.perf_counter()
        ids = tok.encode(texts[i % len(texts)]) if tok is not None else None
        t1 = time.perf_counter()
        if not use_tok_ids or ids is None:
            ids = ids_all[i % len(ids_all)][None]
        if program == "search":
            top = model.run([ids] if bound else [ids, None])[-1][0]
            t2 = t3 = time.perf_counter()
        else:
            emb = model.run([ids])[0]
            t2 = time.perf_counter()
            top = scorer.search(emb)
            t3 = time.perf_counter()
        last["top"] = top
        if times is not None:
            _record_stages(times, tok is not None, program, t0, t1, t2, t3)

    times, elapsed = _loop(spec, step)
    k = int(spec.get("k", 10))
    result["top_ids_last"] = [int(x) for x in np.asarray(last["top"]).ravel()[:k]]
    result["tokenizer_feeds_encoder"] = use_tok_ids
    if spec.get("report_queries") and program != "search":
        # after the timed runs (the peak is already what it is): what the host needs for the
        # recall of this gallery against an exact fp32 one, the embeddings and their top-k
        q = np.concatenate([model.run([ids_all[j:j + 1]])[0] for j in range(min(len(ids_all), int(spec["report_queries"])))])
        result["queries"] = {"emb": q.astype(np.float32).round(6).tolist(),
                             "top": [[int(x) for x in scorer.search(e)] for e in q]}
    return times, elapsed


def _record_stages(times: dict, tokenized: bool, program: str, t0: float, t1: float, t2: float, t3: float) -> None:
    if tokenized:
        times.setdefault("tokenize", []).append((t1 - t0) * 1e3)
    if program == "search":
        times.setdefault("search", []).append((t3 - t1) * 1e3)
    else:
        times.setdefault("encode", []).append((t2 - t1) * 1e3)
        times.setdefault("score_topk", []).append((t3 - t2) * 1e3)
        times.setdefault("search", []).append((t3 - t1) * 1e3)
    if tokenized:
        times.setdefault("end_to_end", []).append((t3 - t0) * 1e3)


def _finish(spec: dict, result: dict, times: dict, elapsed: float) -> dict:
    stages = {name: summarize_ms(vals) for name, vals in times.items()}
    result["stages"] = stages
    result["runs"] = max((s["n"] for s in stages.values()), default=0)
    result["elapsed_s"] = round(elapsed, 3)
    if spec.get("keep_samples"):
        result["samples_ms"] = {k: [round(v, 4) for v in vals] for k, vals in times.items()}
    result["memory"] = memory_status()
    return result


# mode -> the function that times it (bare and outputs are handled in run_job: nothing is timed)
MODES = {"search": _job_search, "image": _job_image, "bare": None, "outputs": None}


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mcad.device.runner", description=__doc__.split("\n")[0])
    ap.add_argument("--spec", required=True, help="job spec JSON file (or '-' for stdin)")
    ap.add_argument("--out", help="also write the result JSON here")
    args = ap.parse_args(argv)
    try:
        spec = json.load(sys.stdin) if args.spec == "-" else json.load(open(args.spec))
        base = os.path.dirname(os.path.abspath(args.spec)) if args.spec != "-" else os.getcwd()
        for key in ("model", "ids", "tokenizer", "inputs", "outputs"):
            if isinstance(spec.get(key), str) and not os.path.isabs(spec[key]):
                spec[key] = os.path.join(base, spec[key])
        if spec.get("gallery", {}).get("file") and not os.path.isabs(spec["gallery"]["file"]):
            spec["gallery"]["file"] = os.path.join(base, spec["gallery"]["file"])
        result = run_job(spec)
        result["ok"] = True
    except (RunnerError, OSError, ValueError, KeyError, ImportError) as e:
        msg = f"{type(e).__name__}: {e}".splitlines()[0]
        result = {"ok": False, "error": msg}
        if os.environ.get("MCAD_DEBUG"):
            traceback.print_exc()
    except Exception as e:  # a runtime failing inside: still one line back to the harness
        result = {"ok": False, "error": f"{type(e).__name__}: {e}".splitlines()[0][:500]}
        if os.environ.get("MCAD_DEBUG"):
            traceback.print_exc()
    text = json.dumps(result)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    sys.stdout.write(f"\n{RESULT_TAG} {text}\n")
    sys.stdout.flush()
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
