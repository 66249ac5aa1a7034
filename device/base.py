"""What every device runs: a `Job` (one artifact, one thread count, one gallery size) -> one result row."""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from mcad.artifacts import Artifact
from mcad.device.errors import DeviceError

log = logging.getLogger("mcad.device")
RUNNER_FILE = Path(__file__).with_name("runner.py")
RESULT_RE = re.compile(r"^MCAD_RESULT (\{.*\})\s*$", re.M)


@dataclass(frozen=True)
class Timing:
    """Warm-up, then at least `min_runs` runs and `min_time_s` seconds (capped by the max_*)."""
    warmup: int = 10
    min_runs: int = 200
    max_runs: int = 5000
    min_time_s: float = 2.0
    max_time_s: float = 20.0

    @classmethod
    def quick(cls) -> "Timing":
        return cls(warmup=3, min_runs=15, max_runs=300, min_time_s=0.0, max_time_s=2.0)


@dataclass
class Job:
    subject: str                  # student | student-mobile | clip-vit-b32-text | mobilevit-small ...
    artifact: Artifact
    threads: int = 1
    mode: str = "search"          # search | image
    gallery: int | None = None    # N gallery embeddings (search)
    scorer: str = "faiss"         # faiss | numpy
    k: int = 10
    ids: Path | None = None       # int64 [Q, L] .npy: the encoder's input token ids
    tokenizer: Path | None = None
    tokenizer_feeds_encoder: bool = False
    context_length: int | None = None
    texts: list = field(default_factory=list)
    embed_dim: int | None = None
    image_size: int | None = None
    timing: Timing = field(default_factory=Timing)
    seed: int = 0
    gallery_dtype: str = "fp32"   # fp32 | fp16 | int8 (faiss scalar quantizers, device.runner.Scorer)
    rerank: int = 0               # re-rank the k * rerank best from the fp32 rows of gallery_file
    gallery_file: Path | None = None  # the gallery's fp32 rows as .npy (None: seeded random unit vectors)
    report_queries: int = 0       # after timing, this many queries' embeddings and top-k (recall on the host)

    @property
    def program(self) -> str:
        return "search" if self.artifact.role == "search" else "encoder"

    @property
    def key(self) -> str:
        g = f"/N={self.gallery}" if self.gallery else ""
        if self.gallery and self.gallery_dtype != "fp32":
            g += f"/{self.gallery_dtype}" + (f"-rerank{self.rerank}" if self.rerank else "")
        return f"{self.subject}/{self.artifact.label}/t{self.threads}{g}"

    def spec(self, names: dict[str, str] | None = None) -> dict:
        """The runner's JSON spec; `names` maps local paths to what the runner sees (remote names)."""
        names = names or {}

        def p(x):
            return None if x is None else names.get(str(x), str(x))

        spec = {"mode": self.mode, "runtime": self.artifact.runtime, "model": p(self.artifact.path),
                "input_names": [t.name for t in self.artifact.inputs],
                "threads": self.threads, "program": self.program, "k": self.k,
                "warmup": self.timing.warmup, "min_runs": self.timing.min_runs,
                "max_runs": self.timing.max_runs, "min_time_s": self.timing.min_time_s,
                "max_time_s": self.timing.max_time_s}
        if self.mode == "search":
            gallery = {"n": int(self.gallery or 0), "seed": self.seed, "dtype": self.gallery_dtype, "rerank": self.rerank}
            if self.program == "search":  # the layout the program takes its gallery in (rows | columns)
                gallery["layout"] = self.artifact.gallery_layout
                if self.artifact.notes.get("gallery_bound"):  # the program holds its gallery: none to give
                    gallery["bound"] = dict(self.artifact.notes["gallery_bound"])
            if self.gallery_file is not None:
                gallery["file"] = p(self.gallery_file)
            spec.update({"scorer": self.scorer, "gallery": gallery, "report_queries": self.report_queries,
                         "ids": p(self.ids), "tokenizer": p(self.tokenizer), "texts": list(self.texts),
                         "tokenizer_is_model_tokenizer": self.tokenizer_feeds_encoder,
                         "context_length": self.context_length, "embed_dim": self.embed_dim})
        else:
            spec["image_size"] = self.image_size
        return spec

    def bare_spec(self, names: dict[str, str] | None = None) -> dict:
        """Same imports as the job, nothing loaded."""
        spec = self.spec(names)
        spec["mode"] = "bare"
        if self.mode != "search":
            spec["scorer"] = "none"
            spec.pop("tokenizer", None)
        return spec

    def bare_key(self) -> tuple:
        search = self.mode == "search"
        return (self.artifact.runtime, self.scorer if search and self.program != "search" else "none",
                bool(self.tokenizer) and search)

    def describe(self) -> dict:
        a = self.artifact
        return {"subject": self.subject, "artifact": a.name, "role": a.role, "runtime": a.runtime,
                "target": a.target, "backend": a.backend, "quantization": a.quantization, "file": a.path.name, "bytes": a.bytes,
                "threads": self.threads, "mode": self.mode, "gallery": self.gallery,
                "gallery_dtype": self.gallery_dtype if self.mode == "search" else None,
                "rerank": self.rerank if self.mode == "search" else None,
                "scorer": ("search program" if self.program == "search" else self.scorer) if self.mode == "search" else None,
                "k": self.k if self.mode == "search" else None}

    def with_(self, **kw) -> "Job":
        return replace(self, **kw)


def parse_runner_output(text: str, where: str) -> dict:
    """The runner's `MCAD_RESULT {...}` line -> dict; a failed job -> DeviceError (one line)."""
    m = None
    for m in RESULT_RE.finditer(text or ""):
        pass
    if m is None:
        tail = " ".join((text or "").strip().splitlines()[-1:])[:300]
        raise DeviceError(f"{where}: runner printed no result{': ' + tail if tail else ''}")
    res = json.loads(m.group(1))
    if not res.get("ok"):
        raise DeviceError(f"{where}: {res.get('error', 'runner failed')}")
    return res


def memory_summary(runtime: str, full: dict | None, bare: dict | None) -> dict:
    """Peak resident memory, the bare runtime's, the part model+gallery add, and the headline figure:
    the added part for ExecuTorch (its Python runtime imports torch, ~350-400 MB that a phone's
    native runtime does not carry), the whole process for LiteRT and ONNX Runtime."""
    out: dict = {"peak_mb": None, "bare_mb": None, "added_mb": None, "headline_mb": None, "headline": None}
    if not full or full.get("peak_mb") is None:
        return out
    out["peak_mb"] = round(float(full["peak_mb"]), 2)
    out["source"] = full.get("source")
    if bare and bare.get("peak_mb") is not None:
        out["bare_mb"] = round(float(bare["peak_mb"]), 2)
        out["added_mb"] = round(out["peak_mb"] - out["bare_mb"], 2)
    if runtime == "executorch" and out["added_mb"] is not None:
        out["headline_mb"], out["headline"] = out["added_mb"], "added over bare runtime (ExecuTorch Python runtime imports torch)"
    else:
        out["headline_mb"], out["headline"] = out["peak_mb"], "whole-process peak"
    return out


class Device:
    """Base: `connect()` -> info dict, `run(job)` -> row dict, `close()`."""
    kind = "base"

    def __init__(self, name: str, timeout_s: float = 900.0):
        self.name = name
        self.timeout_s = float(timeout_s)
        self.info: dict = {}
        self._bare: dict[tuple, dict] = {}

    def connect(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def run(self, job: Job) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def cannot_run(self, runtime: str) -> str | None:
        """Why this (connected) device cannot run `runtime`'s artifacts, None when it can: asked
        before anything is built for it."""
        return None

    def close(self) -> None:
        pass

    def budget_names(self) -> list[str]:
        """Names under which benchmarks/budgets.yaml may list this device (most specific first)."""
        return [self.name]

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def row(self, job: Job, res: dict, bare: dict | None) -> dict:
        row = job.describe()
        row.update({"device": self.name, "device_kind": self.kind, "runner": res.get("runner", "python"),
                    "stages": res.get("stages", {}), "runs": res.get("runs"),
                    "memory": memory_summary(job.artifact.runtime, res.get("memory"), (bare or {}).get("memory")),
                    "cpus": res.get("cpus"), "load_model_s": res.get("load_model_s"),
                    "build_gallery_s": res.get("build_gallery_s"),
                    "tokenizer_feeds_encoder": res.get("tokenizer_feeds_encoder")})
        if res.get("gallery"):
            row["embed_dim"] = res["gallery"].get("dim")
            row["gallery_source"] = res["gallery"].get("source")
            row["gallery_bytes"] = res["gallery"].get("bytes")
        if res.get("queries"):
            row["queries"] = res["queries"]  # the bench turns them into recall and drops them
        if res.get("embed_dim"):
            row["embed_dim"] = res["embed_dim"]
        for k in ("note", "native"):
            if res.get(k):
                row[k] = res[k]
        return row
