"""The student's encoders for indexing and querying: eager PyTorch from a run folder, or an exported
artifact (ONNX Runtime, LiteRT, ExecuTorch) described by `runs/<name>/export/<target>/manifest.json`
(docs/interfaces.md). Every encoder knows which student it is (path + sha256 of student.safetensors)
so an index can refuse queries from another student."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mcad.io import read_json, sha256_file
from mcad.search.common import SearchError

log = logging.getLogger("mcad.search")
STUDENT = "student.safetensors"


@dataclass(frozen=True)
class StudentRef:
    """Which student made the embeddings: its run folder, weights file and their sha256."""
    run: str | None
    weights: str | None
    sha256: str

    def to_json(self) -> dict:
        return {"run": self.run, "path": self.weights, "sha256": self.sha256}

    def short(self) -> str:
        return f"{self.weights or self.run or '?'} (sha256 {self.sha256[:12]})"


def student_ref(run: str | Path) -> StudentRef:
    from mcad.runs import resolve_run

    run = resolve_run(run)
    weights = run / STUDENT
    return StudentRef(str(run), str(weights), sha256_file(weights))


def l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


class Encoder:
    """`enc(batch) -> float32 [B, D]` unit rows. `batch` is uint8 pixels [B,3,S,S] (role image) or
    int64 token ids [B,L] (role text). `calls`/`items` count the work done (tests use them)."""

    role: str = "image"
    embed_dim: int = 0
    image_size: int = 0
    context_length: int = 0
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    student: StudentRef

    def __init__(self) -> None:
        self.calls = 0
        self.items = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        self.items += len(batch)
        return l2n(self._run(batch))

    def _run(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _pixels(self, batch: np.ndarray) -> np.ndarray:
        from mcad.data.images import normalize

        return normalize(batch, self.image_mean, self.image_std).numpy()


# -- eager -----------------------------------------------------------------------------------------
class EagerEncoder(Encoder):
    def __init__(self, run: str | Path, role: str, model=None) -> None:
        super().__init__()
        from mcad.runs import load_student

        self.student = student_ref(run)
        if model is None:
            model, _ = load_student(run)
        self.role = role
        self.module = (model.image_encoder() if role == "image" else model.text_encoder()).eval()
        self.embed_dim = int(model.embed_dim)
        self.image_size = int(model.image_size)
        self.context_length = int(model.context_length)
        self.image_mean, self.image_std = tuple(model.image_mean), tuple(model.image_std)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            if self.role == "image":
                from mcad.data.images import normalize

                x = normalize(batch, self.image_mean, self.image_std)
            else:
                x = torch.as_tensor(np.asarray(batch, dtype=np.int64))
            return self.module(x).float().numpy()

    def describe(self) -> dict:
        return {"kind": "eager", "runtime": "pytorch", "role": self.role, "file": self.student.weights,
                "sha256": self.student.sha256}


# -- exported artifacts ----------------------------------------------------------------------------
RUNTIMES = ("onnxruntime", "litert", "executorch")


def _runtime_of(path: Path, entry: dict | None) -> str:
    if entry and entry.get("runtime"):
        return str(entry["runtime"])
    return {".onnx": "onnxruntime", ".tflite": "litert", ".pte": "executorch"}.get(path.suffix, "?")


def _manifest_student_sha(m: dict) -> str | None:
    """The student sha256 an export manifest records, under whichever key the exporter used."""
    for key in ("student_sha256", "student_sha"):
        if isinstance(m.get(key), str):
            return m[key]
    st = m.get("student")
    if isinstance(st, dict) and isinstance(st.get("sha256"), str):
        return st["sha256"]
    for f in m.get("files", []) if isinstance(m.get("files"), list) else []:
        if isinstance(f, dict) and str(f.get("path", "")).endswith(STUDENT) and f.get("sha256"):
            return f["sha256"]
    return None


def _find_run(artifact: Path, manifest: dict) -> Path | None:
    cands = []
    if manifest.get("run"):
        r = Path(str(manifest["run"]))
        cands += [r, artifact.parent / r] if not r.is_absolute() else [r]
    if len(artifact.resolve().parents) > 2:
        cands.append(artifact.resolve().parents[2])  # runs/<name>/export/<target>/<file>
    for c in cands:
        if (c / STUDENT).is_file():
            return c
    return None


class _OnnxRunner:
    def __init__(self, path: Path, threads: int | None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        inp = self.sess.get_inputs()[0]
        self.name = inp.name
        self.dtype = {"tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(float)": np.float32,
                      "tensor(float16)": np.float16}.get(inp.type, np.float32)
        b = inp.shape[0] if inp.shape else None
        self.fixed_batch = b if isinstance(b, int) and b > 0 else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.sess.run(None, {self.name: x.astype(self.dtype)})[0], dtype=np.float32)


class _LiteRTRunner:
    def __init__(self, path: Path, threads: int | None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # pragma: no cover - the old name (see shared/stack.md)
            from tflite_runtime.interpreter import Interpreter
        self.it = Interpreter(model_path=str(path), num_threads=threads or 1)
        self.it.allocate_tensors()
        self.inp = self.it.get_input_details()[0]
        self.out = self.it.get_output_details()[0]
        sig = list(self.inp.get("shape_signature", self.inp["shape"]))
        self.dynamic = bool(sig) and sig[0] == -1
        self.fixed_batch = None if self.dynamic else int(self.inp["shape"][0])
        self._batch = int(self.inp["shape"][0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.dynamic and len(x) != self._batch:
            self.it.resize_tensor_input(self.inp["index"], [len(x), *x.shape[1:]])
            self.it.allocate_tensors()
            self.inp = self.it.get_input_details()[0]
            self.out = self.it.get_output_details()[0]
            self._batch = len(x)
        dt = self.inp["dtype"]
        scale, zp = self.inp.get("quantization", (0.0, 0))
        if np.issubdtype(dt, np.integer) and scale and np.issubdtype(x.dtype, np.floating):
            info = np.iinfo(dt)
            x = np.clip(np.round(x / scale + zp), info.min, info.max)
        self.it.set_tensor(self.inp["index"], x.astype(dt))
        self.it.invoke()
        y = self.it.get_tensor(self.out["index"])
        scale, zp = self.out.get("quantization", (0.0, 0))
        if np.issubdtype(y.dtype, np.integer) and scale:
            y = (y.astype(np.float32) - zp) * scale
        return np.asarray(y, dtype=np.float32)


class _ExecuTorchRunner:
    def __init__(self, path: Path, entry: dict | None):
        from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(str(path)).load_method("forward")
        shape = ((entry or {}).get("inputs") or [{}])[0].get("shape")
        self.fixed_batch = int(shape[0]) if shape else 1
        self.dtype = np.dtype(((entry or {}).get("inputs") or [{}])[0].get("dtype", "float32"))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        out = self.method.execute([torch.from_numpy(np.ascontiguousarray(x.astype(self.dtype)))])
        return out[0].detach().float().numpy()


class ArtifactEncoder(Encoder):
    """An exported encoder file; preprocessing (size, mean/std) and identity come from its manifest."""

    def __init__(self, path: str | Path, role: str, threads: int | None = None) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such encoder artifact")
        mpath = path.parent / "manifest.json"
        if not mpath.exists():
            raise SearchError(f"{path}: no manifest.json beside the artifact (written by `make export`)")
        m = read_json(mpath)
        entry = next((a for a in m.get("artifacts", []) if Path(str(a.get("file", ""))).name == path.name), None)
        if entry is None:
            raise SearchError(f"{path}: not listed in {mpath} 'artifacts'")
        if entry.get("role") and entry["role"] != role:
            raise SearchError(f"{path}: is a {entry['role']} artifact; this needs the {role} encoder")
        self.sha256 = sha256_file(path)
        if entry.get("sha256") and entry["sha256"] != self.sha256:
            raise SearchError(f"{path}: sha256 differs from {mpath} (file changed after export; re-export)")
        if entry.get("parity_pass") is False:
            log.warning("%s: failed its parity check against the eager student (see %s 'parity'); "
                        "its embeddings may rank differently", path, mpath)
        self.role, self.path, self.manifest, self.entry = role, path, m, entry
        self.runtime = _runtime_of(path, entry)
        run = _find_run(path, m)
        recorded = _manifest_student_sha(m)
        if run is not None:
            self.student = student_ref(run)
            if recorded and recorded != self.student.sha256:
                raise SearchError(f"{path}: exported from student sha256 {recorded[:12]} but {run / STUDENT} "
                                  f"is now {self.student.sha256[:12]} (re-export)")
        elif recorded:
            self.student = StudentRef(str(m.get("run")) if m.get("run") else None, None, recorded)
        else:
            raise SearchError(f"{path}: cannot tell which student it was exported from "
                              f"(no run folder with {STUDENT} and no student sha256 in {mpath})")
        self.run_dir = Path(self.student.run) if self.student.run and Path(self.student.run).is_dir() else None
        self.embed_dim = int(m.get("embed_dim") or (entry.get("outputs") or [{}])[0].get("shape", [0, 0])[-1])
        self.image_size = int(m.get("image_size") or 0)
        self.context_length = int(m.get("context_length") or 0)
        self.image_mean = tuple(m.get("image_mean") or self.image_mean)
        self.image_std = tuple(m.get("image_std") or self.image_std)
        if self.runtime == "onnxruntime":
            self.runner = _OnnxRunner(path, threads)
        elif self.runtime == "litert":
            self.runner = _LiteRTRunner(path, threads)
        elif self.runtime == "executorch":
            self.runner = _ExecuTorchRunner(path, entry)
        else:
            raise SearchError(f"{path}: unknown runtime {self.runtime!r} (known: {', '.join(RUNTIMES)})")
        if role == "image" and not self.image_size:
            shape = (entry.get("inputs") or [{}])[0].get("shape") or [0]
            self.image_size = int(shape[-1])

    def tokenizer_path(self) -> Path:
        if self.run_dir is not None and (self.run_dir / "tokenizer.json").exists():
            return self.run_dir / "tokenizer.json"
        return self.path.parent / str(self.manifest.get("tokenizer", "tokenizer.json"))

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = self._pixels(batch) if self.role == "image" else np.asarray(batch, dtype=np.int64)
        fb = self.runner.fixed_batch
        if not fb or fb == len(x):
            return self.runner(x)
        outs = []
        for s in range(0, len(x), fb):
            chunk = x[s:s + fb]
            n = len(chunk)
            if n < fb:  # pad the last chunk to the artifact's fixed batch
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fb - n, axis=0)])
            outs.append(self.runner(chunk)[:n])
        return np.concatenate(outs)

    def describe(self) -> dict:
        return {"kind": "artifact", "runtime": self.runtime, "role": self.role, "file": str(self.path),
                "sha256": self.sha256, "backend": self.entry.get("backend"),
                "quantization": self.entry.get("quantization"), "target": self.manifest.get("target")}


def load_image_encoder(run: str | Path | None = None, encoder: str | Path | None = None,
                       threads: int | None = None) -> Encoder:
    if encoder:
        return ArtifactEncoder(encoder, "image", threads)
    if not run:
        raise SearchError("which student? give run=runs/<name> or encoder=runs/<name>/export/<target>/<file>")
    return EagerEncoder(run, "image")


def load_text_encoder(run: str | Path | None = None, encoder: str | Path | None = None,
                      threads: int | None = None):
    """(text encoder, tokenizer): the tokenizer is the run folder's tokenizer.json (as in training)."""
    from mcad.tokenizer import Tokenizer

    if encoder:
        enc = ArtifactEncoder(encoder, "text", threads)
        tok = Tokenizer.load(enc.tokenizer_path(), context_length=enc.context_length or None)
        return enc, tok
    if not run:
        raise SearchError("which student? give run=runs/<name> or encoder=runs/<name>/export/<target>/<file>")
    from mcad.runs import load_student

    model, tok = load_student(run)
    return EagerEncoder(run, "text", model=model), tok


def describe_any(enc: Any) -> dict:
    return enc.describe() if hasattr(enc, "describe") else {"kind": type(enc).__name__}
