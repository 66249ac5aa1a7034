"""What every backend module shares: the export job it builds for (options, encoders, calibration
samples, output folder), writing one artifact (`Job.write` -> `Built`), the programs and example
inputs it lowers, and the quantization scheme it records."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mcad.export.backends import BY_NAME, module
from mcad.export.programs import SEARCH_K, example_inputs, program
from mcad.io import atomic_path

log = logging.getLogger("mcad.export")

MAX_GALLERY = 100_000  # upper bound of the dynamic gallery rows of a search program traced with a dynamic N
FIXED_GALLERY = 1000   # gallery rows the search programs of runtimes without a dynamic N are traced with

# Backends whose search program with a run-time gallery costs more than the text encoder + a flat
# scan the same export ships (benchmarks/results/scan_forms.md): XNNPACK (ExecuTorch's delegate,
# LiteRT's default) packs a run-time weight every call, and NPU delegates commonly take a fully
# connected layer's weights only as constants (the full-integer TFLite). Not made unless the gallery
# is bound in (gallery=; XNNPACK and LiteRT) or asked for (any_gallery_search=1).
RUN_GALLERY_SLOW = ("xnnpack", "tflite", "tflite_full")
RUN_GALLERY_MSG = ("a search program with a run-time gallery costs more than the text encoder + a flat scan here (its "
                   "runtime cannot scan a run-time weight at a flat scan's cost, benchmarks/results/scan_forms.md): bind "
                   "the gallery instead (`mcad index ... bind=<target>` or gallery=<.npy of unit rows>: ExecuTorch and "
                   "LiteRT programs holding it), or any_gallery_search=1 to make this one anyway")


class SdkMissing(RuntimeError):
    """strict=1 and a backend of the plan cannot be made here."""


@dataclass
class Built:
    """One file this export wrote, while it is checked (the manifest's Artifact is made from it)."""
    role: str
    backend: str
    runtime: str
    path: Path
    quantization: str
    notes: dict = field(default_factory=dict)     # notes["group"]: the backend that built it
    meta: dict = field(default_factory=dict)      # I/O as the runtime reports it
    outputs: list | None = None                   # runtime outputs on the held-out inputs


def eager_embed(module_: torch.nn.Module, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([module_(x[s:s + batch]) for s in range(0, len(x), batch)]).numpy()


def eager_embed_b1(module_: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """One input at a time: what a batch-1 program (a converted PT2E graph) takes."""
    with torch.no_grad():
        return torch.cat([module_(x[i:i + 1]) for i in range(len(x))]).numpy()


@dataclass
class Job:
    """One export's shared state: set up by the exporter, read by every backend's `build`, which
    adds its artifacts, skips and eager simulations to it."""
    opts: Any                          # mcad.export.options.Options (checked)
    towers: Any                        # mcad.export.encoders.Towers
    out: Path
    bound: Any = None                  # export.bound.BoundGallery: the gallery bound into search programs
    calib: Any = None                  # quantize.calib.Samples (train split) once calibrated
    calib_gallery: np.ndarray | None = None  # fp32 image embeddings of the calibration images
    test: Any = None                   # the held-out Samples (None: nothing checked)
    artifacts: list[Built] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    simulated: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        self.encoders = {r: self.towers.encoder(r) for r in ("text", "image") if self.towers.encoder(r) is not None}

    @property
    def roles(self) -> tuple[str, ...]:
        return self.opts.roles

    @property
    def soc(self) -> str:
        return self.opts.soc_name

    # -- what is made ----------------------------------------------------------------------------
    def roles_for(self, backend: str) -> tuple[str, ...]:
        """The programs `backend` makes: all roles, less a search program that would cost more than
        the encoder + scan beside it (RUN_GALLERY_SLOW)."""
        from mcad.export.bound import bound_dtype

        binds = self.bound is not None and bound_dtype(backend, self.opts.bound_dtype) is not None
        slow = backend in RUN_GALLERY_SLOW and not binds and not self.opts.any_gallery_search
        return tuple(r for r in self.roles if not (slow and r == "search"))

    def planned_files(self) -> set[str]:
        """Every file name this export may write besides the manifest, tokenizer and golden file."""
        return {module(b).file_name(r, self) for b in self.opts.plan() for r in self.roles_for(b)}

    def needed(self) -> list[str]:
        """The encoders the programs need (search needs the text encoder)."""
        return [r for r in ("text", "image") if r in self.roles or (r == "text" and "search" in self.roles)]

    # -- writing ---------------------------------------------------------------------------------
    def write(self, role: str, backend: str, build: Callable[[Path], None], quantization: str, **notes) -> Built:
        """`build(path)` writes the file (to a temp path, renamed into place when it succeeds)."""
        path = self.out / module(backend).file_name(role, self)
        log.info("building %s", path.name)
        with atomic_path(path) as tmp:
            build(tmp)
        b = BY_NAME[backend]
        art = Built(role, b.manifest_name, b.runtime, path, quantization, notes)
        art.notes.setdefault("group", backend)
        self.artifacts.append(art)
        return art

    def skip(self, artifact: str, reason: str) -> None:
        self.skipped.append({"artifact": artifact, "reason": reason})

    def skip_slow_search(self, backend: str) -> None:
        if "search" in self.roles and "search" not in self.roles_for(backend):
            self.skip(module(backend).file_name("search", self), RUN_GALLERY_MSG)

    def skip_all(self, backend: str, reason: str) -> None:
        for role in self.roles:
            self.skip(module(backend).file_name(role, self), reason)

    # -- programs --------------------------------------------------------------------------------
    def cores(self, quantizer: str, per_role: dict[str, str] | None = None) -> dict[str, tuple]:
        """{role: (core module, PT2E quantizer or None)} of the needed encoders: PT2E-quantized with
        `quantizer` (or `per_role[role]`) on the calibration samples, or float at precision=fp32."""
        from mcad.quantize.pt2e import Core, quantize_core

        need = self.needed()
        if self.opts.precision == "fp32":
            return {r: (Core(self.encoders[r]).eval(), None) for r in need}
        calib = {"text": self.calib.ids, "image": self.calib.pixels}
        q = {r: (per_role or {}).get(r, quantizer) for r in need}
        return {r: quantize_core(self.encoders[r], calib[r], q[r], self.opts.keep_fp32, soc=self.soc,
                                 progress=self.opts.progress, desc=f"calibrate {q[r]} {r}")
                for r in need}

    def float_cores(self) -> dict[str, tuple]:
        from mcad.quantize.pt2e import Core

        return {r: (Core(self.encoders[r]).eval(), None) for r in self.needed()}

    def programs(self, cores: dict, scan: str = "rows-t", backend: str = "") -> dict:
        """The role programs over `cores`. `scan`: the search program's scan form for the runtime
        (export.programs.SCANS); with a gallery to bind (gallery=), `backend`'s search program holds it."""
        from mcad.export.bound import bound_dtype, gallery_scan

        text, image = cores.get("text", (None,))[0], cores.get("image", (None,))[0]
        bound = None
        dtype = bound_dtype(backend, self.opts.bound_dtype)
        if self.bound is not None and dtype is not None and "search" in self.roles:
            bound = gallery_scan(self.bound.rows, dtype)
        return {r: program(r, text, image, scan=scan, bound=bound) for r in self.roles_for(backend)}

    def example(self, role: str, gallery: int = 64, layout: str = "rows") -> tuple:
        return example_inputs(self.towers, role, gallery, layout)

    def bound_example(self, role: str, example: tuple) -> tuple:
        """A program holding its gallery takes the ids only."""
        return example[:1] if role == "search" and self.bound is not None else example

    def dynamic(self, layout: str = "rows") -> tuple:
        """Dynamic shapes of a search program's (ids, gallery): any row count from k to MAX_GALLERY."""
        from torch.export import Dim

        return ({}, {1 if layout == "columns" else 0: Dim("n", min=SEARCH_K, max=MAX_GALLERY)})

    # -- what the manifest says --------------------------------------------------------------------
    def pt2e_scheme(self, quantizer: str) -> str:
        from mcad.quantize import pt2e

        if self.opts.precision == "fp32":
            return "fp32 (not quantized)"
        return pt2e.scheme(quantizer, pt2e.parse_keep(self.opts.keep_fp32, quantizer))

    def bound_notes(self, role: str, backend: str) -> dict:
        """Manifest notes of a search program with the gallery bound in (none for the others)."""
        from mcad.export.bound import bound_dtype

        dtype = bound_dtype(backend, self.opts.bound_dtype)
        if role != "search" or self.bound is None or dtype is None:
            return {}
        return {"gallery_bound": self.bound.record(dtype)}

    def bound_scheme(self, role: str, backend: str, scheme: str) -> str:
        """The quantization a program records: its encoder's, and how a bound gallery is held."""
        notes = self.bound_notes(role, backend)
        if not notes:
            return scheme
        dtype = notes["gallery_bound"]["dtype"]
        return scheme + ("; gallery bound in: int8 dynamic (per-row int8 weights, the query quantized per call)"
                         if dtype == "int8" else "; gallery bound in: fp32")

