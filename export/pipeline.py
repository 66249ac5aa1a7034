"""`make export`: quantize the run's student, lower it for a target, run every artifact in its
real runtime against the eager fp32 student, and write runs/<name>/export/<target>/ with a
manifest (docs/interfaces.md), tokenizer.json and golden.npz.

Targets and what they hold, each with a text and an image encoder, and search programs: ONNX
Runtime's, QNN's and MediaTek's take any gallery at run time; XNNPACK's and LiteRT's are made with a
gallery bound in (gallery=, export.bound) or when asked for (any_gallery_search=1: RUN_GALLERY_SLOW),
full-integer TFLite's only when asked for:
  cpu         ExecuTorch XNNPACK int8 .pte, ONNX int8 (QDQ), TFLite int8 (PT2E)
  snapdragon  ExecuTorch QNN (HTP, soc=SM8650|SM8750|...) .pte when $QNN_SDK_ROOT has a QNN SDK;
              always XNNPACK .pte + ONNX int8 + TFLite int8 (what Qualcomm AI Hub compiles);
              hub=1: AI Hub compile jobs for the SoC, compiled assets downloaded
  dimensity   TFLite full-integer A16W8 (int8 weights, int16 activations: NeuroPilot; A8W8 for NNAPI
              with npu_activation_bits=8), XNNPACK .pte, ExecuTorch
              MediaTek .pte when the NeuroPilot SDK's mtk_converter/mtk_neuron import
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcad.artifacts import MANIFEST, Artifact, ExportManifest, Tensor, gallery_input
from mcad.export import folder
from mcad.export import parity as P
from mcad.export.programs import INPUT_NAMES, NAMES, OUTPUT_NAMES, ROLES, SEARCH_K, example_inputs, program
from mcad.export.encoders import Towers
from mcad.io import atomic_path, now_iso, sha256_file, versions, write_json

log = logging.getLogger("mcad.export")

TARGETS = ("cpu", "snapdragon", "dimensity")
PLAN = {
    "cpu": ("xnnpack", "onnx", "tflite"),
    "snapdragon": ("qnn", "xnnpack", "onnx", "tflite", "hub"),
    "dimensity": ("tflite_full", "xnnpack", "mediatek"),
}
BACKEND_RUNTIME = {"xnnpack": "executorch", "qnn": "executorch", "mediatek": "executorch",
                   "onnx": "onnxruntime", "tflite": "litert", "tflite_full": "litert"}
DEFAULT_SOC = {"snapdragon": "SM8650", "dimensity": "mt6989"}
# TFLite tensor names of ops that sit directly in the program wrapper (not in its encoder core)
WRAPPER_OPS = r"^mcad\.export\.programs\.[A-Za-z]+(;|$)"

QNN_SDK_MSG = ("the Qualcomm HTP artifact (ExecuTorch QNN .pte) needs the QNN SDK (Qualcomm AI Engine "
               "Direct / QAIRT): install it and set QNN_SDK_ROOT=/path/to/qairt/<version> (the folder "
               "with lib/x86_64-linux-clang/libQnnHtp.so)")
MTK_SDK_MSG = ("the MediaTek APU artifact (ExecuTorch MediaTek .pte) needs the NeuroPilot SDK's Python "
               "packages mtk_converter and mtk_neuron: pip install the wheels from the NeuroPilot "
               "Express SDK into .venv")
HUB_MSG = ("hub=1 needs Qualcomm AI Hub credentials and network: run `.venv/bin/qai-hub configure "
           "--api_token <token>` (writes ~/.qai_hub/client.ini)")


# The quantization choices per backend that are not the PT2E quantizers' own (one table): measured
# on the default student (benchmarks/results/parity.md): ONNX Runtime's MinMax ranges lost 1.3 R@1
# i2t, percentile ranges keep |dR@1| <= 0.6; 8-bit activations in the full-integer TFLite lost
# 1.2, 16-bit ones (A16W8, int8 weights) 0.3, and NeuroPilot and QNN HTP both run A16W8.
ONNX_CALIBRATION = ("percentile", "minmax", "entropy")
NPU_SCHEMES = {16: "a16w8", 8: "int8"}


@dataclass
class Options:
    target: str = "cpu"
    run: str | Path | None = None
    data: Any = None                # None: the data the run was trained on (its manifest's data: spec)
    out: str | Path | None = None
    calib: int = 256
    strict: bool = False
    hub: bool = False
    soc: str | None = None
    keep_fp32: Any = None
    precision: str = "int8"
    parity: bool = True
    parity_images: int = 0          # 0: the whole test split
    queries: int = 16
    max_gallery: int = 100_000      # upper bound of the search program's dynamic gallery rows
    fixed_gallery: int = 1000       # rows the TFLite / QNN search programs are traced with
    onnx_calibration: str = "percentile"  # ONNX Runtime activation ranges: minmax | percentile | entropy
    npu_activation_bits: int = 16   # full-integer TFLite activations: 16 (A16W8, NeuroPilot/HTP) or 8 (A8W8)
    backends: tuple[str, ...] | None = None  # subset of the target's plan (tests)
    roles: tuple[str, ...] = ROLES            # subset of text, image, search (tests)
    # bind this gallery (.npy of unit rows [N, D], or random:N) into the XNNPACK and LiteRT search
    # programs (export.bound; an index folder: `mcad index ... bind=<target>`); default out:
    # runs/<name>/export/<target>-bound
    gallery: str | Path | None = None
    bound_dtype: str = "int8"       # ExecuTorch's bound gallery: int8 | fp32 (LiteRT binds fp32)
    any_gallery_search: bool = False  # also the XNNPACK / LiteRT search programs with a run-time gallery (RUN_GALLERY_SLOW)
    seed: int = 0
    progress: bool = True


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


# Backends whose search program with a run-time gallery costs more than the text encoder + a flat
# scan the same export ships: XNNPACK (ExecuTorch's delegate, LiteRT's default) packs a run-time
# weight every call, so the scan costs 2-3x (ExecuTorch) and 3.7-5.3x (LiteRT) faiss's at 100k
# (benchmarks/results/scan_forms.md) and the program 2.2-3x its encoder + scan; the full-integer
# TFLite one (A16W8, for NPU delegates, which commonly take a fully connected layer's weights only as
# constants) 2.5x on the CPU. Not made unless the gallery is bound in (gallery=; XNNPACK and LiteRT)
# or asked for (any_gallery_search=1); ONNX Runtime's (columns, ~1x) and the QNN and MediaTek ones
# (not measurable here) are made as before.
RUN_GALLERY_SLOW = ("xnnpack", "tflite", "tflite_full")
RUN_GALLERY_MSG = ("a search program with a run-time gallery runs 2.2-3x the text encoder + a flat scan here (its runtime "
                   "cannot scan a run-time weight at a flat scan's cost, benchmarks/results/scan_forms.md): bind the gallery instead "
                   "(`mcad index ... bind=<target>` or gallery=<.npy of unit rows>: ExecuTorch and LiteRT programs holding it, "
                   "0.35-1.1x), or any_gallery_search=1 to make this one anyway")


class SdkMissing(RuntimeError):
    pass


# -- availability ----------------------------------------------------------------------------------
def mediatek_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("mtk_converter", "mtk_neuron"))


def hub_configured() -> bool:
    return (Path.home() / ".qai_hub" / "client.ini").exists() or bool(os.environ.get("QAIHUB_CLIENT_INI"))


def check_sdks(opts: Options) -> list[tuple[str, str]]:
    """(artifact, reason) for what this target cannot make here; raises under strict."""
    from mcad.quantize.pt2e import qnn_sdk_root

    plan = effective_plan(opts)
    missing = []
    if "qnn" in plan and qnn_sdk_root() is None:
        missing.append(("qnn", QNN_SDK_MSG))
    if "mediatek" in plan and not mediatek_available():
        missing.append(("mediatek", MTK_SDK_MSG))
    if opts.hub and "hub" in plan and not hub_configured():
        missing.append(("hub", HUB_MSG))
    if opts.strict and missing:
        raise SdkMissing(f"strict=1: {missing[0][1]}")
    return missing


def effective_plan(opts: Options) -> tuple[str, ...]:
    plan = PLAN[opts.target]
    if not opts.hub:
        plan = tuple(b for b in plan if b != "hub")
    if opts.backends:
        unknown = set(opts.backends) - set(PLAN[opts.target])
        if unknown:
            raise ValueError(f"backends={','.join(sorted(unknown))}: not part of target {opts.target} "
                             f"({', '.join(PLAN[opts.target])})")
        plan = tuple(b for b in plan if b in opts.backends)
    return plan


# -- helpers ---------------------------------------------------------------------------------------
def _file_name(role: str, backend: str, precision: str, soc: str | None, npu_scheme: str = "a16w8") -> str:
    base = NAMES[role]
    if backend == "xnnpack":
        return f"{base}.xnnpack.{precision}.pte"
    if backend == "qnn":
        return f"{base}.qnn.{soc.lower()}.{precision}.pte"
    if backend == "mediatek":
        return f"{base}.mediatek.{soc.lower()}.{precision}.pte"
    if backend == "onnx":
        return f"{base}.{precision}.onnx"
    if backend == "tflite":
        return f"{base}.{precision}.tflite"
    if backend == "tflite_full":
        return f"{base}.full_{npu_scheme}.tflite" if precision == "int8" else f"{base}.{precision}.tflite"
    raise ValueError(backend)


def _eager_embed(module, x: torch.Tensor, batch: int = 64) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([module(x[s:s + batch]) for s in range(0, len(x), batch)]).numpy()


def _eager_embed_b1(module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([module(x[i:i + 1]) for i in range(len(x))]).numpy()


class Exporter:
    """`towers` / `calib` given (the bench): those encoders, calibrated on those samples, no run's
    data needed; otherwise the run's student and samples of `opts.data`."""

    def __init__(self, opts: Options, towers: Towers | None = None, calib=None):
        from mcad.quantize.pt2e import parse_keep
        from mcad.runs import STUDENT, latest_run, load_student, run_record

        if opts.target not in TARGETS:
            raise ValueError(f"target={opts.target!r}: unknown target (one of {', '.join(TARGETS)})")
        if opts.precision not in ("int8", "fp32"):
            raise ValueError(f"precision={opts.precision!r}: expected int8 or fp32")
        if opts.onnx_calibration not in ONNX_CALIBRATION:
            raise ValueError(f"onnx_calibration={opts.onnx_calibration!r}: expected one of {', '.join(ONNX_CALIBRATION)}")
        if opts.npu_activation_bits not in NPU_SCHEMES:
            raise ValueError(f"npu_activation_bits={opts.npu_activation_bits}: expected 16 (A16W8) or 8 (A8W8)")
        self.npu_scheme = NPU_SCHEMES[opts.npu_activation_bits]
        self.opts = opts
        self.keep_opt = opts.keep_fp32
        parse_keep(self.keep_opt)  # unknown names: one line, before any work
        self.soc = str(opts.soc or DEFAULT_SOC.get(opts.target, "SM8650"))
        self.tokenizer = None
        if towers is None:
            self.run = Path(opts.run) if opts.run is not None else latest_run()
            model, self.tokenizer = load_student(self.run)
            if getattr(model, "kind", None) != "dual":
                raise ValueError(f"{self.run}: the run's student is not a dual encoder")
            towers = Towers.of(model.eval())
        else:
            self.run = Path(opts.run) if opts.run is not None else None
        self.towers = towers
        self.student_sha = sha256_file(self.run / STUDENT) if self.run and (self.run / STUDENT).exists() else None
        # the run's manifest, read once: its data (which calibrates and checks the export unless data=
        # says otherwise: a student of a user's photos is not calibrated on the synthetic set; none for a
        # run from before manifests: the embedded default), its preprocessing and its teachers
        self.record = run_record(self.run) if self.run is not None else {}
        self.data = opts.data if opts.data is not None else (self.record.get("config") or {}).get("data")
        self.given_calib = calib
        if opts.parity and self.tokenizer is None:
            raise ValueError("parity needs the run's student and data (towers were given): pass parity=False")
        self.plan = effective_plan(opts)
        unknown = set(opts.roles) - set(ROLES)
        if unknown or not opts.roles:
            raise ValueError(f"roles={','.join(opts.roles)}: expected a subset of {', '.join(ROLES)}")
        if set(opts.roles) - set(towers.roles):
            raise ValueError(f"roles={','.join(opts.roles)}: {towers.name} makes only {', '.join(towers.roles)}")
        self.roles = tuple(r for r in ROLES if r in opts.roles)
        self.missing = check_sdks(opts)
        if opts.out is None and self.run is None:
            raise ValueError("out= is needed when no run folder is exported")
        self.bound = None
        if opts.bound_dtype not in ("int8", "fp32"):
            raise ValueError(f"bound_dtype={opts.bound_dtype!r}: expected int8 or fp32")
        if opts.gallery:
            from mcad.export.bound import load_gallery

            if "search" not in self.roles:
                raise ValueError(f"gallery={opts.gallery}: binds a gallery into the search programs, and roles= has none")
            self.bound = load_gallery(opts.gallery, towers.embed_dim)
        self.out = Path(opts.out) if opts.out is not None else default_out(self.run, opts)
        self.previous = folder.claim(self.out, self.planned_files())  # a user's folder: refused before any work
        self.artifacts: list[Built] = []
        self.skipped: list[dict] = []
        self.simulated: dict[str, dict] = {}
        self.test = None
        self.encoders = {r: towers.encoder(r) for r in ("text", "image") if towers.encoder(r) is not None}

    def planned_files(self) -> set[str]:
        """Every file name this export may write (hub downloads aside)."""
        names = {MANIFEST, "tokenizer.json", "golden.npz"}
        names.update(_file_name(r, b, self.opts.precision, self.soc, self.npu_scheme)
                     for b in self.plan if b != "hub" for r in self.roles_for(b))
        return names

    def roles_for(self, backend: str) -> tuple[str, ...]:
        """The programs `backend` makes: all roles, less a search program that would cost more than
        the encoder + scan beside it (RUN_GALLERY_SLOW)."""
        from mcad.export.bound import bound_dtype

        binds = self.bound is not None and bound_dtype(backend, self.opts.bound_dtype) is not None
        slow = backend in RUN_GALLERY_SLOW and not binds and not self.opts.any_gallery_search
        return tuple(r for r in self.roles if not (slow and r == "search"))

    def _skip_slow_search(self, backend: str) -> None:
        if "search" in self.roles and "search" not in self.roles_for(backend):
            self._skip(_file_name("search", backend, self.opts.precision, self.soc, self.npu_scheme), RUN_GALLERY_MSG)

    # -- data ---------------------------------------------------------------------------------
    def load_data(self) -> None:
        from mcad.quantize.calib import load_samples

        o = self.opts
        if self.given_calib is not None:
            self.calib = self.given_calib
        else:
            self.calib = load_samples(self.towers, self.tokenizer, self.data, n=o.calib, split="train", seed=o.seed)
        if "search" in self.roles:  # a calibration gallery for quantizers that see the whole search program
            self.calib_gallery = _eager_embed(self.encoders["image"], torch.as_tensor(self.calib.pixels)).astype(np.float32)
        if self.tokenizer is None or (self.given_calib is not None and not o.parity):
            return  # calibration given, nothing checked: no held-out data, no golden file (the bench)
        self.test = load_samples(self.towers, self.tokenizer, self.data, n=o.parity_images, split="test",
                                 seed=o.seed, captions_per_image=0)
        ids, px = torch.as_tensor(self.test.ids), torch.as_tensor(self.test.pixels)
        self.ref = {"text": _eager_embed(self.encoders["text"], ids), "image": _eager_embed(self.encoders["image"], px)}
        # search inputs: queries spread over the captions, gallery = fp32 image embeddings
        n_q = max(1, min(o.queries, len(ids)))
        self.q_idx = np.linspace(0, len(ids) - 1, n_q).round().astype(int)
        self.gallery = self.ref["image"].astype(np.float32)
        if "search" in self.roles and len(self.gallery) < SEARCH_K:
            raise ValueError(f"{self.test.source}: {len(self.gallery)} test images, the search program's parity "
                             f"needs >= {SEARCH_K}: give a data set with more, or roles=text,image")

    def inputs(self, role: str, layout: str | None = None, bound: bool = False) -> list[list[np.ndarray]]:
        """The held-out inputs of a program; a search program's gallery in its `layout`, none when
        the program holds it (`bound`)."""
        if role == "text":
            return [[self.test.ids[i:i + 1]] for i in range(len(self.test.ids))]
        if role == "image":
            return [[self.test.pixels[i:i + 1]] for i in range(len(self.test.pixels))]
        if bound:
            return [[self.test.ids[i:i + 1]] for i in self.q_idx]
        g = gallery_input(self.gallery, layout)
        return [[self.test.ids[i:i + 1], g] for i in self.q_idx]

    # -- building -----------------------------------------------------------------------------
    def _write(self, role: str, backend: str, build, quantization: str, **notes) -> Built:
        name = _file_name(role, backend, self.opts.precision, self.soc, self.npu_scheme)
        path = self.out / name
        log.info("building %s", name)
        with atomic_path(path) as tmp:
            build(tmp)
        art = Built(role, "tflite" if backend == "tflite_full" else backend, BACKEND_RUNTIME[backend], path,
                    quantization, notes)
        art.notes.setdefault("group", backend)
        self.artifacts.append(art)
        return art

    def _skip(self, artifact: str, reason: str) -> None:
        self.skipped.append({"artifact": artifact, "reason": reason})

    def _needed(self) -> list[str]:
        """The encoders the programs need (search needs the text encoder)."""
        return [r for r in ("text", "image") if r in self.roles or (r == "text" and "search" in self.roles)]

    def _cores(self, backend: str):
        """{role: (core module, pt2e quantizer or None)} for text/image."""
        from mcad.quantize.pt2e import Core, quantize_core

        need = self._needed()
        if self.opts.precision == "fp32":
            return {r: (Core(self.encoders[r]).eval(), None) for r in need}
        calib = {"text": self.calib.ids, "image": self.calib.pixels}
        return {r: quantize_core(self.encoders[r], calib[r], backend, self.keep_opt, soc=self.soc,
                                 progress=self.opts.progress, desc=f"calibrate {backend} {r}")
                for r in need}

    def _programs(self, cores, scan: str = "rows-t", backend: str | None = None):
        """`scan`: the search program's scan form for the runtime (export.programs.SCANS); with a
        gallery to bind (gallery=), `backend`'s search program holds it (export.bound.BOUND_DTYPE)."""
        from mcad.export.bound import bound_dtype, gallery_scan

        text, image = cores.get("text", (None,))[0], cores.get("image", (None,))[0]
        bound = None
        dtype = bound_dtype(backend or "", self.opts.bound_dtype)
        if self.bound is not None and dtype is not None and "search" in self.roles:
            bound = gallery_scan(self.bound.rows, dtype)
        return {r: program(r, text, image, scan=scan, bound=bound) for r in self.roles_for(backend or "")}

    def _bound_notes(self, role: str, backend: str) -> dict:
        """Manifest notes of a search program with the gallery bound in (none for the others)."""
        from mcad.export.bound import bound_dtype

        dtype = bound_dtype(backend, self.opts.bound_dtype)
        if role != "search" or self.bound is None or dtype is None:
            return {}
        return {"gallery_bound": self.bound.record(dtype)}

    def _bound_scheme(self, role: str, backend: str, scheme: str) -> str:
        """The quantization a program records: its encoder's, and how a bound gallery is held."""
        notes = self._bound_notes(role, backend)
        if not notes:
            return scheme
        dtype = notes["gallery_bound"]["dtype"]
        return scheme + ("; gallery bound in: int8 dynamic (per-row int8 weights, the query quantized per call)"
                         if dtype == "int8" else "; gallery bound in: fp32")

    def _bound_example(self, role: str, example):
        return example[:1] if role == "search" and self.bound is not None else example

    def _float_programs(self, scan: str = "rows-t"):
        from mcad.quantize.pt2e import Core

        return self._programs({r: (Core(self.encoders[r]).eval(), None) for r in self._needed()}, scan=scan)

    def _scheme(self, kind: str) -> str:
        from mcad.quantize import onnx_quant, pt2e, tflite_quant

        if self.opts.precision == "fp32":
            return "fp32 (not quantized)"
        keep = pt2e.parse_keep(self.keep_opt, kind)
        if kind == "onnx":
            return onnx_quant.scheme(keep, self.opts.onnx_calibration)
        if kind == "tflite_full":
            return tflite_quant.scheme(keep, self.opts.npu_activation_bits)
        return pt2e.scheme(kind, keep)

    def _dyn(self, layout: str = "rows"):
        from torch.export import Dim

        return ({}, {1 if layout == "columns" else 0: Dim("n", min=SEARCH_K, max=int(self.opts.max_gallery))})

    def _example(self, role: str, gallery: int = 64, layout: str = "rows"):
        return example_inputs(self.towers, role, gallery, layout)

    def build_xnnpack(self) -> None:
        from mcad.export.builders import build_xnnpack

        cores = self._cores("xnnpack")
        progs = self._programs(cores, scan="rows", backend="xnnpack")
        self._skip_slow_search("xnnpack")
        for role in self.roles_for("xnnpack"):
            ex = self._bound_example(role, self._example(role))
            run_gallery = role == "search" and len(ex) == 2
            dyn = self._dyn() if run_gallery else None
            self._write(role, "xnnpack", lambda p, m=progs[role], e=ex, d=dyn, g=run_gallery:
                        build_xnnpack(m, e, p, dynamic_shapes=d, alloc_inputs=not g),
                        self._bound_scheme(role, "xnnpack", self._scheme("xnnpack")),
                        gallery_rows=[SEARCH_K, self.opts.max_gallery] if run_gallery else None,
                        **self._bound_notes(role, "xnnpack"))

    def build_qnn(self) -> None:
        from mcad.export.builders import build_qnn
        from mcad.quantize.pt2e import qnn_sdk_root

        # The QNN quantizer runs with or without the SDK; its eager (fake-quant) numbers tell what
        # HTP int8 will do, even where the .pte cannot be made.
        cores = self._cores("qnn")
        progs = self._programs(cores)
        if self.opts.precision == "int8" and self.test is not None:
            x = {"text": torch.as_tensor(self.test.ids), "image": torch.as_tensor(self.test.pixels)}
            self.simulated[f"qnn-{self.soc.lower()}"] = {r: _eager_embed_b1(progs[r], x[r])
                                                         for r in ("text", "image") if r in progs}
        if qnn_sdk_root() is None:
            for role in self.roles:
                self._skip(_file_name(role, "qnn", self.opts.precision, self.soc), QNN_SDK_MSG)
            return
        for role in self.roles:
            ex = self._example(role, self.opts.fixed_gallery)
            self._write(role, "qnn", lambda p, m=progs[role], e=ex: build_qnn(m, e, p, self.soc),
                        self._scheme("qnn"), soc=self.soc,
                        gallery_rows=self.opts.fixed_gallery if role == "search" else None)

    def build_mediatek(self) -> None:
        from mcad.export.builders import MEDIATEK_PLATFORMS, build_mediatek, mediatek_quantizer

        if not mediatek_available():
            for role in self.roles:
                self._skip(_file_name(role, "mediatek", self.opts.precision, self.soc), MTK_SDK_MSG)
            return
        if self.soc.lower() not in MEDIATEK_PLATFORMS:
            raise ValueError(f"soc={self.soc}: unknown Dimensity platform ({', '.join(MEDIATEK_PLATFORMS)})")
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        from mcad.quantize.pt2e import Core, as_quantizer, batches, parse_keep

        cores = {}
        calib = {"text": self.calib.ids, "image": self.calib.pixels}
        for r in self._needed():
            x = calib[r]
            core = Core(self.encoders[r]).eval()
            gm = torch.export.export(core, (torch.as_tensor(x[:1]),)).module()
            prepared = prepare_pt2e(gm, as_quantizer(mediatek_quantizer(), parse_keep(self.keep_opt, "mediatek")))
            with torch.no_grad():
                for b in batches(x):
                    prepared(b)
            cores[r] = (convert_pt2e(prepared), None)
        progs = self._programs(cores)
        for role in self.roles:
            ex = self._example(role, self.opts.fixed_gallery)
            self._write(role, "mediatek", lambda p, m=progs[role], e=ex: build_mediatek(m, e, p, self.soc.lower()),
                        "int8 PT2E static (NeuroPilot quantizer A8W8)", platform=self.soc.lower(),
                        gallery_rows=self.opts.fixed_gallery if role == "search" else None)

    def build_onnx(self) -> None:
        from mcad.export.builders import build_onnx
        from mcad.quantize import onnx_quant, pt2e
        from mcad.quantize.onnx_quant import quantize_onnx

        float_progs = self._float_programs(scan="columns")  # the gallery input is [D, N]: see SCANS
        for role in self.roles:
            ex = self._example(role, layout="columns")
            dyn = self._dyn("columns") if role == "search" else None

            def build(p, role=role, ex=ex, dyn=dyn):
                if self.opts.precision == "fp32":
                    build_onnx(float_progs[role], ex, p, INPUT_NAMES[role], OUTPUT_NAMES[role], dynamic_shapes=dyn)
                    return
                fp = p.with_name(p.name + ".fp32.onnx")
                try:
                    build_onnx(float_progs[role], ex, fp, INPUT_NAMES[role], OUTPUT_NAMES[role], dynamic_shapes=dyn)
                    calib = {"text": lambda: {"ids": self.calib.ids}, "image": lambda: {"pixels": self.calib.pixels},
                             "search": lambda: {"ids": self.calib.ids, "gallery": self.calib_gallery.T.copy()}}[role]()
                    used.update(quantize_onnx(fp, p, calib, self.keep_opt, method=self.opts.onnx_calibration))
                finally:
                    if fp.exists():
                        fp.unlink()

            used: dict = {}
            art = self._write(role, "onnx", build, self._scheme("onnx"),
                              gallery_rows=[SEARCH_K, None] if role == "search" else None,
                              gallery_layout="columns" if role == "search" else None)
            if used.get("fallback"):  # the manifest says which ranges the artifact really has
                art.quantization = onnx_quant.scheme(pt2e.parse_keep(self.keep_opt, "onnx"), used["method"])
                art.notes["calibration_fallback"] = used["fallback"]

    def build_tflite(self) -> None:
        from mcad.export.builders import build_tflite

        cores = self._cores("litert")
        progs = self._programs(cores, backend="tflite")
        self._skip_slow_search("tflite")
        for role in self.roles_for("tflite"):
            ex = self._bound_example(role, self._example(role, self.opts.fixed_gallery))
            run_gallery = role == "search" and len(ex) == 2
            self._write(role, "tflite", lambda p, m=progs[role], e=ex, r=role, q=cores["text" if role == "search" else role][1]:
                        build_tflite(m, e, p, INPUT_NAMES[r][:len(e)], pt2e_quantizer=q),
                        self._bound_scheme(role, "tflite", self._scheme("litert")),
                        gallery_rows=[SEARCH_K, None] if run_gallery else None,
                        note="traced with a fixed gallery; resize_tensor_input to any N >= 10" if run_gallery else None,
                        **self._bound_notes(role, "tflite"))

    def build_tflite_full(self) -> None:
        from mcad.export.builders import build_tflite
        from mcad.quantize.tflite_quant import full_integer

        float_progs = self._float_programs()
        self._skip_slow_search("tflite_full")
        for role in self.roles_for("tflite_full"):
            ex = self._example(role, self.opts.fixed_gallery)

            def build(p, role=role, ex=ex):
                if self.opts.precision == "fp32":
                    build_tflite(float_progs[role], ex, p, INPUT_NAMES[role], x64=False)
                    return
                fp = p.with_name(p.name + ".fp32.tflite")
                try:
                    build_tflite(float_progs[role], ex, fp, INPUT_NAMES[role], x64=False)  # int32 ids for NPUs
                    ids = self.calib.ids.astype(np.int32)
                    calib = {"text": {"ids": ids}, "image": {"pixels": self.calib.pixels}, "search": {"ids": ids}}[role]
                    # the L2 normalisation (and the search tail) stays float: same query embedding in
                    # the text encoder and the search program, and no int8 rounding of the output
                    full_integer(fp, p, calib, self.keep_opt, float_regex=WRAPPER_OPS,
                                 activation_bits=self.opts.npu_activation_bits,
                                 fixed={"gallery": np.resize(self.calib_gallery, (self.opts.fixed_gallery,
                                                                                  self.towers.embed_dim))}
                                 if role == "search" else None)
                finally:
                    if fp.exists():
                        fp.unlink()

            self._write(role, "tflite_full", build, self._scheme("tflite_full"),
                        gallery_rows=[SEARCH_K, None] if role == "search" else None,
                        note="traced with a fixed gallery; resize_tensor_input to any N >= 10" if role == "search" else None)

    def build_hub(self) -> None:
        from mcad.export.hub import compile_on_hub

        if not hub_configured():
            self._skip("qai-hub compiled assets", HUB_MSG)
            return
        onnx = [a for a in self.artifacts if a.backend == "onnx"]
        try:
            for art, path, info in compile_on_hub(onnx, self.out, self.soc):
                a = Built(art.role, "qnn", "qnn", path, art.quantization + "; compiled by Qualcomm AI Hub",
                          dict(info, group="hub", source=art.path.name))
                self.artifacts.append(a)
        except Exception as e:  # network, credentials, quota: say so, keep the local artifacts
            if self.opts.strict:
                raise RuntimeError(f"hub=1: Qualcomm AI Hub compile failed ({type(e).__name__}: {e})") from None
            self._skip("qai-hub compiled assets", f"Qualcomm AI Hub compile failed: {type(e).__name__}: {e}")

    # -- running ------------------------------------------------------------------------------
    def run_artifacts(self) -> None:
        """Every artifact this machine can run, in its real runtime, on the held-out inputs."""
        from mcad.runtimes import HOST_RUNTIMES, ExecuTorchWorker, run_artifact

        with ExecuTorchWorker() as worker:  # one child process for every .pte (started when needed)
            for a in self.artifacts:
                if a.runtime in HOST_RUNTIMES:
                    bound = "gallery_bound" in a.notes
                    a.outputs, a.meta = run_artifact(a.path, self.inputs(a.role, a.notes.get("gallery_layout"), bound),
                                                     a.runtime, names=INPUT_NAMES[a.role][:1 if bound else None],
                                                     worker=worker)

    def check(self) -> dict:
        from mcad.retrieval import retrieval_metrics

        c2i = self.test.caption_to_image
        fp = retrieval_metrics(self.ref["image"] @ self.ref["text"].T, c2i)
        out: dict[str, Any] = {"reference": "eager fp32 student", "data": self.test.source,
                               "n_images": int(len(self.test.pixels)), "n_captions": int(len(self.test.ids)),
                               "bars": dict(P.BARS), "fp32": {k: round(v, 2) for k, v in fp.items()},
                               "artifacts": {}, "retrieval": {}, "simulated": {}}
        emb: dict[str, dict[str, np.ndarray]] = {}
        for a in self.artifacts:
            if a.outputs is None:
                out["artifacts"][a.path.name] = {"role": a.role, "group": a.notes["group"], "pass": None,
                                                 "note": "not run here (needs the device)"}
                continue
            rec: dict[str, Any] = {"role": a.role, "group": a.notes["group"]}
            if a.role in ("text", "image"):
                e = np.concatenate([o[0] for o in a.outputs]).astype(np.float32)
                emb.setdefault(a.notes["group"], {})[a.role] = e
                rec.update(P.cosine_stats(e, self.ref[a.role]))
            out["artifacts"][a.path.name] = rec
        for a in self.artifacts:  # search needs the group's text embeddings
            if a.outputs is None or a.role != "search":
                continue
            scores = np.concatenate([o[0] for o in a.outputs]).astype(np.float32)
            idx = np.concatenate([o[1] for o in a.outputs]).astype(np.int64)
            text = emb.get(a.notes["group"], {}).get("text")
            q_same = text[self.q_idx] if text is not None else None
            bound = a.notes.get("gallery_bound")
            s = P.search_check(idx, scores, q_same, self.ref["text"][self.q_idx],
                               self.bound.rows if bound else self.gallery,
                               shared_query=a.notes["group"] != "tflite_full",
                               int8_gallery=bool(bound) and bound["dtype"] == "int8")
            out["artifacts"][a.path.name].update({"search": s, "pass": s["pass"]})
        for group, e in emb.items():
            if "text" in e and "image" in e:
                out["retrieval"][group] = P.retrieval_check(e["image"], e["text"], c2i, fp)
        for name, e in self.simulated.items():
            rec = {r: P.cosine_stats(v, self.ref[r]) for r, v in e.items()}
            if "text" in e and "image" in e:
                rec["retrieval"] = P.retrieval_check(e["image"], e["text"], c2i, fp)
            out["simulated"][name] = rec
        ok = all(r.get("pass") is not False for r in out["artifacts"].values()) and \
            all(r["pass"] for r in out["retrieval"].values())
        for name, rec in out["artifacts"].items():  # an encoder whose retrieval misses fails too
            r = out["retrieval"].get(rec.get("group", ""))
            if r is not None and rec.get("role") in ("text", "image") and not r["pass"]:
                rec["pass"] = False
        out["pass"] = bool(ok)
        return out

    # -- files ------------------------------------------------------------------------------------
    def write_golden(self, n: int = 4, gallery: int = 100) -> Path:
        from mcad.export.programs import brute_force_topk

        ids = self.test.ids[:n]
        px = self.test.pixels[:n]
        te = self.ref["text"][:n]
        ie = _eager_embed(self.encoders["image"], torch.as_tensor(px))
        g = self.gallery[:max(gallery, SEARCH_K)]
        _, v, i = brute_force_topk(torch.as_tensor(te), torch.as_tensor(g), SEARCH_K)
        texts = np.array([self.tokenizer.decode(r) for r in ids])  # ids are what a device feeds; texts for humans
        path = self.out / "golden.npz"
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, ids=ids.astype(np.int64), captions=texts, pixels=px.astype(np.float32),
                         text_emb=te.astype(np.float32), image_emb=ie.astype(np.float32),
                         gallery=g.astype(np.float32), topk_scores=v.numpy().astype(np.float32),
                         topk_indices=i.numpy().astype(np.int64))
        return path

    def io_spec(self, a: Built) -> tuple[list[Tensor], list[Tensor]]:
        """Inputs/outputs as the runtime reports them, named after the program's arguments."""
        spec = a.meta or self._reported(a)
        ins, outs = spec.get("inputs"), spec.get("outputs")
        if not ins:  # not openable here (a device-only runtime): what the program was traced with
            D = self.towers.embed_dim
            ex = self._example(a.role, layout=a.notes.get("gallery_layout") or "rows")
            ex = ex[:1] if "gallery_bound" in a.notes else ex  # a bound program takes the ids only
            ins = [{"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")} for x in ex]
            outs = [{"shape": [1, D], "dtype": "float32"}] if a.role != "search" else \
                [{"shape": [1, SEARCH_K], "dtype": "float32"}, {"shape": [1, SEARCH_K], "dtype": "int64"}]
        ins = [Tensor(n, list(x["shape"]), x["dtype"], x.get("quantization")) for x, n in zip(ins, INPUT_NAMES[a.role])]
        outs = [Tensor(n, list(x["shape"]), x["dtype"], x.get("quantization")) for x, n in zip(outs, OUTPUT_NAMES[a.role])]
        if a.role == "search" and len(ins) > 1:
            D = self.towers.embed_dim
            ins[1].shape = [D, "N"] if a.notes.get("gallery_layout") == "columns" else ["N", D]
        return ins, outs

    def _reported(self, a: Built) -> dict:
        """Not run (parity off): ONNX Runtime and LiteRT still say what the file takes (cheap)."""
        from mcad.runtimes import open_artifact

        if a.runtime not in ("onnxruntime", "litert"):
            return {}
        with open_artifact(a.path, a.runtime, names=INPUT_NAMES[a.role]) as s:
            return s.spec()

    def manifest(self, parity: dict | None, golden: str | None) -> ExportManifest:
        from mcad.quantize.pt2e import parse_keep

        arts = []
        for a in self.artifacts:
            ins, outs = self.io_spec(a)
            rec = (parity or {}).get("artifacts", {}).get(a.path.name, {})
            arts.append(Artifact(name=NAMES[a.role], role=a.role, runtime=a.runtime, backend=a.backend,
                                 file=a.path.name, bytes=a.path.stat().st_size, sha256=sha256_file(a.path),
                                 quantization=a.quantization, inputs=ins, outputs=outs,
                                 k=SEARCH_K if a.role == "search" else None,
                                 notes={k: v for k, v in a.notes.items() if v is not None and k != "group"},
                                 parity_pass=rec.get("pass")))
        t = self.towers
        calib = self.calib
        return ExportManifest(
            target=self.opts.target, run=str(self.run) if self.run else None, model=t.name,
            student_sha256=self.student_sha, created=now_iso(), embed_dim=t.embed_dim,
            context_length=t.context_length if t.text_encoder is not None else 0,
            image_size=t.image_size if t.image_encoder is not None else 0,
            image_mean=list(t.image_mean), image_std=list(t.image_std),
            tokenizer="tokenizer.json" if self.tokenizer is not None else None, golden=golden,
            soc=self.soc if self.opts.target != "cpu" else None, precision=self.opts.precision,
            keep_fp32={b: ["l2-normalize", *parse_keep(self.keep_opt, "litert" if b == "tflite" else b)]
                       for b in self.plan if b != "hub"},
            calibration={"source": calib.source, "images": int(len(calib)), "captions": int(len(calib.ids)),
                         "seed": self.opts.seed},
            artifacts=arts, skipped=self.skipped, parity=parity, versions=versions(),
            preprocess=self.preprocess_record(), teachers=self.run_teachers())

    def preprocess_record(self) -> dict | None:
        """What the image encoder's input is made from a file: the run's record (its dual teacher's view)."""
        from mcad.preprocess import record

        t = self.towers
        if t.image_encoder is None:
            return None
        return self.record.get("preprocess") or record(t, t.view)

    def run_teachers(self) -> dict | None:
        """The teachers the run was distilled from (specs and file hashes), as its manifest records them."""
        return self.record.get("teachers")

    # -- all --------------------------------------------------------------------------------------
    def export(self) -> dict:
        """Build, check, and write the manifest; returns the manifest as written (JSON)."""
        o = self.opts
        self.out.mkdir(parents=True, exist_ok=True)
        for backend, reason in self.missing:
            log.info("%s: skipping %s: %s", o.target, backend, reason)
        self.load_data()
        builders = {"xnnpack": self.build_xnnpack, "qnn": self.build_qnn, "mediatek": self.build_mediatek,
                    "onnx": self.build_onnx, "tflite": self.build_tflite, "tflite_full": self.build_tflite_full,
                    "hub": self.build_hub}
        from tqdm import tqdm

        for backend in tqdm(self.plan, desc=f"export {o.target}", unit="backend", disable=not o.progress):
            t0 = time.perf_counter()
            builders[backend]()
            log.info("%s: %s built in %.1f s", o.target, backend, time.perf_counter() - t0)
        if self.tokenizer is not None:
            with atomic_path(self.out / "tokenizer.json") as tmp:
                shutil.copyfile(self.run / "tokenizer.json", tmp)
        golden = self.write_golden().name if self.test is not None else None
        parity = None
        if o.parity:
            t0 = time.perf_counter()
            self.run_artifacts()
            parity = self.check()
            log.info("%s: parity checks in %.1f s", o.target, time.perf_counter() - t0)
        manifest = self.manifest(parity, golden).to_json()
        write_json(self.out / MANIFEST, manifest)
        # only now, with the new record in place: what the previous export wrote and this one did not
        folder.clean(self.out, self.previous, folder.recorded(self.out) or set())
        return manifest


def default_out(run: Path, opts: Options) -> Path:
    """runs/<name>/export/<target>, or <target>-bound for an export with a gallery bound in (so the
    target's general export, which takes any gallery, stays as it is)."""
    return Path(run) / "export" / (opts.target + ("-bound" if opts.gallery else ""))


def export(opts: Options) -> dict:
    return Exporter(opts).export()
