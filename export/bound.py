"""Search programs with the gallery bound in: `mcad export gallery=<.npy | random:N>`, or from an
index folder `mcad index ... bind=<target>` (mcad.search.bind).

A search program that takes its gallery at run time cannot scan it at a flat scan's cost in every
runtime. XNNPACK (ExecuTorch's delegate, LiteRT's default one) packs a fully connected layer's
weights into its own layout: once, at load, for a constant; every call for a run-time input. With
the gallery as that weight, each query repacks it; with the query as the weight (ExecuTorch's rows
form), it is a one-column product that leaves most of the kernel's lanes idle. Bound in as a
constant weight, the gallery is packed once when the program loads and a query is one
matrix-vector product (the measured costs against faiss's flat scan: benchmarks/results/scan_forms.md).
The price: the program is that gallery's; a changed gallery is a new export.

ExecuTorch binds it int8 (per-row symmetric weights, the query quantized per call: XNNPACK's
dynamic-quantized fully connected layer), LiteRT fp32 (its converter's int8 path quantizes
activations statically, which would round the scores the top-k ranks). ONNX Runtime keeps its
run-time gallery: its columns scan already costs about what faiss's does."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

# the backends that bind the gallery, and the dtypes each can bind it in (first: the default); the
# others keep their run-time gallery. ExecuTorch int8 holds a quarter of the bytes at a recall@10 that
# parity reports (benchmarks/results/bound-mobile-local.md, scan_forms.md: random unit vectors, whose
# top-10 sit within int8's error, lose the most): `bound_dtype=fp32` where that is too low.
BOUND_DTYPES = {"xnnpack": ("int8", "fp32"), "tflite": ("fp32",)}


def bound_dtype(backend: str, wanted: str) -> str | None:
    """The dtype `backend` binds the gallery in (None: it keeps a run-time gallery)."""
    have = BOUND_DTYPES.get(backend)
    if have is None:
        return None
    return wanted if wanted in have else have[0]
UNIT_TOL = 1e-3  # rows must be unit vectors (cosine = inner product), as mcad index writes them


@dataclass
class BoundGallery:
    rows: np.ndarray   # float32 [N, D], unit rows
    source: str        # the file or index folder it was read from
    sha256: str        # of the rows' bytes: the manifest says which gallery a program holds

    def record(self, dtype: str) -> dict:
        n, d = self.rows.shape
        return {"n": int(n), "dim": int(d), "dtype": dtype, "source": self.source, "sha256": self.sha256,
                "bytes": int(n * d * (1 if dtype == "int8" else 4))}


def random_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """n seeded random unit rows (what the bench's latency and memory figures need, not recall)."""
    rows = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def load_gallery(path: str | Path, dim: int) -> BoundGallery:
    """The gallery's unit rows from a .npy [N, D] float32 or `random:N[:seed]` (seeded random unit
    rows, for the bench and CI's gate). Bad input is one line naming the file and the fix."""
    import hashlib

    p = Path(path)
    spec = str(path)
    if spec.startswith("random:"):
        parts = spec.split(":")[1:]
        if not 1 <= len(parts) <= 2 or not all(x.isdigit() for x in parts):
            raise ValueError(f"gallery={spec}: expected random:N or random:N:seed (e.g. random:100000)")
        rows = random_rows(int(parts[0]), dim, int(parts[1]) if len(parts) == 2 else 0)
    elif p.suffix == ".npy" and p.is_file():
        rows = np.load(p, mmap_mode="r")
    else:
        raise ValueError(f"gallery={p}: expected a .npy of unit rows [N, D] or random:N (an index folder: "
                         f"`mcad index ... bind=<target>`)")
    if rows.ndim != 2 or rows.shape[1] != dim:
        raise ValueError(f"gallery={p}: shape {tuple(rows.shape)}, the student embeds in {dim} dims: expected [N, {dim}]")
    from mcad.export.programs import SEARCH_K

    if rows.shape[0] < SEARCH_K:
        raise ValueError(f"gallery={p}: {rows.shape[0]} rows, a search program returns {SEARCH_K}: give at least that many")
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    norms = np.linalg.norm(rows, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_TOL)
    if len(bad):
        raise ValueError(f"gallery={p}: row {int(bad[0])} has norm {norms[bad[0]]:.4f} ({len(bad)} rows not unit): "
                         f"give the student's L2-normalised image embeddings (what mcad index stores)")
    return BoundGallery(rows, str(p), hashlib.sha256(rows.tobytes()).hexdigest())


class GalleryScan(nn.Module):
    """q [1, D] -> scores [1, N]: a Linear whose weight rows are the gallery (no bias)."""

    def __init__(self, rows: np.ndarray):
        super().__init__()
        self.scan = nn.Linear(rows.shape[1], rows.shape[0], bias=False)
        with torch.no_grad():
            self.scan.weight.copy_(torch.from_numpy(np.ascontiguousarray(rows)))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return self.scan(q)


def gallery_scan(rows: np.ndarray, dtype: str) -> nn.Module:
    """The scan module to bind: fp32 as is; int8 through PT2E's dynamic per-channel scheme (XNNPACK
    lowers the converted graph to its dynamic-quantized fully connected layer)."""
    m = GalleryScan(rows).eval()
    if dtype == "fp32":
        return m
    if dtype != "int8":
        raise ValueError(f"bound gallery dtype {dtype!r}: expected int8 or fp32")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                         get_symmetric_quantization_config)
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    ex = (torch.zeros(1, rows.shape[1]),)
    qz = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=True))
    with torch.no_grad():
        prepared = prepare_pt2e(torch.export.export(m, ex).module(), qz)
        prepared(*ex)  # dynamic: nothing to calibrate, the observers only need one pass
        return convert_pt2e(prepared)
