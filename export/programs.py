"""The three programs that ship: text encoder, image encoder, and the search program (text
encoder + gallery scoring + top-k in one graph, so a stock runner on the phone runs a whole query)."""
from __future__ import annotations

import torch
from torch import nn

from mcad.models.layers import l2_normalize

SEARCH_K = 10
ROLES = ("text", "image", "search")
NAMES = {"text": "text_encoder", "image": "image_encoder", "search": "search"}
INPUT_NAMES = {"text": ["ids"], "image": ["pixels"], "search": ["ids", "gallery"]}
OUTPUT_NAMES = {"text": ["emb"], "image": ["emb"], "search": ["scores", "indices"]}


class TextProgram(nn.Module):
    """ids int64 [1, L] -> unit embedding float32 [1, D] (core: the text tower + projection)."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.core(ids))


class ImageProgram(nn.Module):
    """pixels float32 [1, 3, S, S] (normalised) -> unit embedding float32 [1, D]."""

    def __init__(self, core: nn.Module):
        super().__init__()
        self.core = core

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.core(pixels))


# How each runtime reads a gallery given at run time fastest (benchmarks/results/scan_forms.md):
# "rows": gallery [N, D] scored as gallery @ q^T (XNNPACK runs it as one fully connected layer over
# the gallery rows, read in place; q @ gallery^T packs the whole gallery each query, far slower);
# "rows-t": gallery [N, D], q @ gallery^T (LiteRT: the rows form's reshape cannot be resized; the
# NPU backends); "columns": gallery [D, N] (the rows transposed once, when the gallery is bound),
# q @ gallery (ONNX Runtime: a plain GEMM, about faiss's flat scan, where q @ gallery^T cost more).
SCANS = ("rows", "rows-t", "columns")


def gallery_layout(scan: str) -> str:
    """The layout of the gallery input a scan form takes: rows [N, D] or columns [D, N]."""
    return "columns" if scan == "columns" else "rows"


class Search(nn.Module):
    """ids int64 [1, L], gallery float32 [N, D] (unit rows; [D, N] for scan="columns") -> scores
    float32 [1, k], indices int64 [1, k]: the k best gallery rows by cosine to the query, best first."""

    def __init__(self, text_core: nn.Module, k: int = SEARCH_K, scan: str = "rows-t"):
        super().__init__()
        if scan not in SCANS:
            raise ValueError(f"search scan {scan!r}: expected one of {', '.join(SCANS)}")
        self.core = text_core
        self.k = int(k)
        self.scan = scan

    def forward(self, ids: torch.Tensor, gallery: torch.Tensor):
        q = l2_normalize(self.core(ids))
        if self.scan == "rows":
            scores = (gallery @ q.transpose(0, 1)).transpose(0, 1)
        elif self.scan == "columns":
            scores = q @ gallery
        else:
            scores = q @ gallery.transpose(0, 1)
        values, indices = torch.topk(scores, self.k, dim=-1)
        return values, indices


class BoundSearch(nn.Module):
    """ids int64 [1, L] -> scores float32 [1, k], indices int64 [1, k] over the gallery bound into
    `scan` (q [1, D] -> scores [1, N]; export.bound): no gallery input, the runtime packs it at load."""

    def __init__(self, text_core: nn.Module, scan: nn.Module, k: int = SEARCH_K):
        super().__init__()
        self.core = text_core
        self.scan = scan
        self.k = int(k)

    def forward(self, ids: torch.Tensor):
        values, indices = torch.topk(self.scan(l2_normalize(self.core(ids))), self.k, dim=-1)
        return values, indices


def program(role: str, text_core: nn.Module | None = None, image_core: nn.Module | None = None,
            scan: str = "rows-t", bound: nn.Module | None = None) -> nn.Module:
    """`bound`: a gallery scan module (export.bound.gallery_scan) to bind into the search program."""
    m = TextProgram(text_core) if role == "text" else ImageProgram(image_core) if role == "image" else \
        BoundSearch(text_core, bound) if bound is not None else Search(text_core, scan=scan)
    m.training = False  # the wrapper only: .eval() would recurse into a converted PT2E graph, which refuses it
    return m


def example_inputs(towers, role: str, gallery_size: int = 64, layout: str = "rows"):
    """Batch-1 example inputs (what is traced; the gallery's row count is a dynamic dim where the
    backend allows it). `towers`: export.towers.Towers, or a DualEncoder."""
    L, S, D = towers.context_length, towers.image_size, towers.embed_dim
    if role == "image":
        return (torch.zeros(1, 3, S, S),)
    eot = towers.eot_id if hasattr(towers, "eot_id") else towers.text.eot_id
    ids = torch.zeros(1, L, dtype=torch.long)
    ids[0, 0], ids[0, 1] = 1, eot
    if role == "text":
        return (ids,)
    g = l2_normalize(torch.randn(max(gallery_size, SEARCH_K), D, generator=torch.Generator().manual_seed(0)))
    return (ids, g.T.contiguous() if layout == "columns" else g)


def brute_force_topk(query: torch.Tensor, gallery: torch.Tensor, k: int = SEARCH_K):
    """Reference search: exact scores [Q, N] and top-k (values, indices) of unit queries."""
    scores = query.float() @ gallery.float().T
    v, i = torch.topk(scores, min(k, gallery.shape[0]), dim=-1)
    return scores, v, i
