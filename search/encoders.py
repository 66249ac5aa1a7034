"""The student's encoders for indexing and querying: eager PyTorch from a run folder, or an exported
artifact (ONNX Runtime, LiteRT, ExecuTorch) described by `runs/<name>/export/<target>/manifest.json`
(docs/interfaces.md). Every encoder knows which student it is (path + sha256 of student.safetensors)
so an index can refuse queries from another student."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
import numpy as np

from mcad.io import sha256_file
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

    @property
    def view(self):
        """How image files are decoded for this encoder (the student's training view)."""
        from mcad.data.stream import View

        return getattr(self, "_view", None) or View(int(self.image_size))

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
        from mcad.preprocess import view_of

        self._view = view_of(model)

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
def _find_run(artifact: Path, run: str | None) -> Path | None:
    cands = []
    if run:
        r = Path(run)
        cands += [r, artifact.parent / r] if not r.is_absolute() else [r]
    if len(artifact.resolve().parents) > 2:
        cands.append(artifact.resolve().parents[2])  # runs/<name>/export/<target>/<file>
    for c in cands:
        if (c / STUDENT).is_file():
            return c
    return None


class ArtifactEncoder(Encoder):
    """An exported encoder file; preprocessing (size, mean/std) and identity come from its manifest,
    running it from mcad.runtimes."""

    def __init__(self, path: str | Path, role: str, threads: int | None = None) -> None:
        super().__init__()
        from mcad.artifacts import MANIFEST, ManifestError, load_manifest, parity_failures, verify_artifact
        from mcad.runtimes import open_artifact

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such encoder artifact")
        mpath = path.parent / MANIFEST
        if not mpath.exists():
            raise SearchError(f"{path}: no {MANIFEST} beside the artifact (written by `make export`)")
        try:
            m = load_manifest(mpath)
        except ManifestError as e:
            raise SearchError(str(e)) from None
        entry = next((a for a in m.artifacts if a.file == path.name), None)
        if entry is None:
            raise SearchError(f"{path}: not listed in {mpath} 'artifacts'")
        if entry.role != role:
            raise SearchError(f"{path}: is a {entry.role} artifact; this needs the {role} encoder")
        try:  # the check every reader of an export shares (mcad.artifacts.verify_artifact)
            self.sha256 = verify_artifact(m, entry)
        except ManifestError as e:
            raise SearchError(str(e)) from None
        if entry.file in parity_failures(m):
            log.warning("%s: failed its parity check against the eager student (see %s 'parity'); "
                        "its embeddings may rank differently", path, mpath)
        self.role, self.path, self.manifest, self.entry = role, path, m, entry
        self.runtime = entry.runtime
        run = _find_run(path, m.run)
        recorded = m.student_sha256
        if run is not None:
            self.student = student_ref(run)
            if recorded and recorded != self.student.sha256:
                raise SearchError(f"{path}: exported from student sha256 {recorded[:12]} but {run / STUDENT} "
                                  f"is now {self.student.sha256[:12]} (re-export: {m.rebuild_command()})")
        elif recorded:
            self.student = StudentRef(m.run, None, recorded)
        else:
            raise SearchError(f"{path}: cannot tell which student it was exported from "
                              f"(no run folder with {STUDENT} and no student_sha256 in {mpath})")
        self.run_dir = Path(self.student.run) if self.student.run and Path(self.student.run).is_dir() else None
        self.embed_dim = m.embed_dim
        self.image_size = m.image_size or (int(entry.inputs[0].shape[-1]) if role == "image" else 0)
        self.context_length = m.context_length
        self.image_mean = tuple(m.image_mean or self.image_mean)
        self.image_std = tuple(m.image_std or self.image_std)
        self._view = m.view if self.image_size else None
        try:
            self.session = open_artifact(path, self.runtime, threads, names=[t.name for t in entry.inputs])
        except ValueError as e:  # a runtime this machine has not (a QNN context binary)
            raise SearchError(str(e)) from None
        batch = self.session.inputs[0]["shape"][0] if self.session.inputs[0]["shape"] else None
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None

    def tokenizer_path(self) -> Path:
        if self.run_dir is not None and (self.run_dir / "tokenizer.json").exists():
            return self.run_dir / "tokenizer.json"
        return self.manifest.tokenizer_path or self.path.parent / "tokenizer.json"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        x = self._pixels(batch) if self.role == "image" else np.asarray(batch, dtype=np.int64)
        fb = self.fixed_batch
        if not fb or fb == len(x):
            return self.session.run([x])[0]
        outs = []
        for s in range(0, len(x), fb):
            chunk = x[s:s + fb]
            n = len(chunk)
            if n < fb:  # pad the last chunk to the artifact's fixed batch
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fb - n, axis=0)])
            outs.append(self.session.run([chunk])[0][:n])
        return np.concatenate(outs)

    def describe(self) -> dict:
        return {"kind": "artifact", "runtime": self.runtime, "role": self.role, "file": str(self.path),
                "sha256": self.sha256, "backend": self.entry.backend,
                "quantization": self.entry.quantization, "target": self.manifest.target}


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
