"""ONNX Runtime static int8 quantization in QDQ format: per-channel symmetric int8 weights,
int8 activations calibrated on the same samples as the PT2E paths.

The float graph comes from `torch.onnx.export(Normalized(Core(encoder)))` (dynamo exporter), so
every node carries its module path in `pkg.torch.onnx.name_scopes`; nodes outside `core` (the L2
normalisation) and whatever `keep_fp32` selects are excluded from quantization by name."""
from __future__ import annotations

import ast
import fnmatch
import logging
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from mcad.quantize.pt2e import calibration_views, parse_keep, resolve_keep

log = logging.getLogger("mcad.quantize")

ONNX_OPS = {"softmax": "Softmax", "_softmax": "Softmax"}
# Ops the QDQ quantizer touches. Softmax/LayerNormalization stay float unless asked otherwise.
OPS_TO_QUANTIZE = ("Conv", "MatMul", "Gemm", "Add", "Mul", "Relu", "Concat", "Gather", "Transpose",
                   "Reshape", "Squeeze", "Unsqueeze", "ReduceMean", "GlobalAveragePool")


def _scopes(node) -> tuple[list[str], list[str]]:
    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "[]"))
    except (ValueError, SyntaxError):
        scopes, classes = [], []
    return list(scopes), list(classes)


def float_nodes(model, keep: Sequence[str], core_prefix: str = "core") -> list[str]:
    """Names of the nodes that stay float: everything outside `core_prefix` and `keep` (same
    aliases as the PT2E paths, matched on the exporter's module scopes and aten op names)."""
    modules, types, ops, ops_in = resolve_keep(keep)
    out = []
    for node in model.graph.node:
        scopes, classes = _scopes(node)
        aten = classes[-1].split(".")[1] if classes and classes[-1].startswith("aten.") else None
        mods = [c.rsplit(".", 1)[-1] for c in classes if not c.startswith("aten.")]
        paths = [s[len(core_prefix) + 1:] for s in scopes if s.startswith(core_prefix + ".")]
        if core_prefix not in scopes:
            out.append(node.name)
        elif aten in ops or ONNX_OPS.get(node.op_type.lower()) and node.op_type.lower() in ops:
            out.append(node.name)
        elif mods and aten in ops_in.get(mods[-1], ()):
            out.append(node.name)
        elif any(m in types for m in mods):
            out.append(node.name)
        elif any(fnmatch.fnmatchcase(p, m) for p in paths for m in modules):
            out.append(node.name)
    return out


class _Reader:
    """Feeds sample i of every input, batch 1."""

    def __init__(self, data: dict[str, np.ndarray]):
        self.data = {k: np.ascontiguousarray(v) for k, v in data.items()}
        self.n = min(len(v) for v in self.data.values())
        self.i = 0

    def get_next(self):
        if self.i >= self.n:
            return None
        feed = {k: v[self.i:self.i + 1] for k, v in self.data.items()}
        self.i += 1
        return feed

    def rewind(self):
        self.i = 0


def quantize_onnx(fp32_path: str | Path, out_path: str | Path, calib: dict[str, np.ndarray],
                  keep_fp32: Iterable[str] | None = None, method: str = "minmax",
                  extra: dict | None = None, recipe=None) -> dict:
    """Write the QDQ int8 model of `fp32_path` to `out_path` (a temp path the caller renames).
    `calib` maps input names to samples [N, ...], fed one at a time; `gallery` (the search
    program's [rows, D] input) is fed whole with every sample; images get the extra calibration
    views of `recipe` (quantize.recipe; None: its defaults)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    keep = parse_keep(keep_fp32, "onnx")
    fallback = None
    out_path = Path(out_path)
    pre = out_path.with_name(out_path.name + ".pre.onnx")
    try:
        # Symbolic shape inference crashes on the Expand of a normalisation; graph optimisation
        # would rename/fuse nodes and lose the module scopes we select float nodes by.
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True, skip_optimization=True)
        model = onnx.load(str(pre))
        exclude = float_nodes(model, keep)
        calib = {k: v if k == "gallery" else calibration_views(v, recipe).numpy() for k, v in calib.items()}
        fixed = {k: v for k, v in calib.items() if k == "gallery"}
        reader = _Reader({k: v for k, v in calib.items() if k not in fixed})
        if fixed:
            base_next = reader.get_next

            def get_next():
                feed = base_next()
                return None if feed is None else {**feed, **fixed}

            reader.get_next = get_next

        class Reader(CalibrationDataReader):
            def get_next(self):
                return reader.get_next()

            def rewind(self):
                reader.rewind()

        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}

        def run(m: str) -> None:
            import contextlib
            import io

            from mcad.quantize.calib import streamed_onnx_calibration

            reader.rewind()
            # ORT's histogram calibrators print their settings to stdout: keep the CLI's output to our lines;
            # they hold one sample's activations at a time (the same ranges as ORT's one pass over all)
            with contextlib.redirect_stdout(io.StringIO()), streamed_onnx_calibration():
                quantize_static(str(pre), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                                op_types_to_quantize=list(OPS_TO_QUANTIZE), nodes_to_exclude=exclude,
                                calibrate_method=methods[m],
                                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, **(extra or {})})

        try:
            run(method)
        except ValueError as e:
            # ORT's histogram calibrators cannot bin a tensor whose values span fewer than 2048
            # float32 steps (a near-constant activation of a barely trained model); MinMax ranges
            # are what a histogram of such a tensor would give anyway.
            if method == "minmax" or "bins" not in str(e):
                raise
            fallback = f"{method} calibration failed ({e}); MinMax ranges used"
            log.warning("ONNX QDQ int8: %s", fallback)
            method = "minmax"
            run(method)
    finally:
        if pre.exists():
            pre.unlink()
    log.info("ONNX QDQ int8: %d calibration samples, %d nodes kept float", reader.n, len(exclude))
    return {"float_nodes": len(exclude), "keep_fp32": list(keep), "method": method, "fallback": fallback}


def scheme(keep_fp32: Sequence[str], method: str = "minmax") -> str:
    keep = ",".join(keep_fp32)
    ranges = {"minmax": "MinMax", "percentile": "Percentile 99.999", "entropy": "Entropy"}[method]
    return ("int8 ONNX Runtime static QDQ: weights per-channel symmetric int8, activations int8 "
            f"calibrated ({ranges}); float: l2-normalize,layernorm{(',' + keep) if keep else ''}")
