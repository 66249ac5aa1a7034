"""Parity of quantization variants on a run's student: each variant's text and image encoders are
built by the export stage, run in their real runtime on the whole test split, and compared with
the eager fp32 student (the numbers behind benchmarks/results/parity.md):

    python benchmarks/studies/parity_variants.py runs/mcad-student onnx:calibration=minmax \
        onnx:calibration=percentile tflite_full:npu_activation_bits=8 tflite_full:npu_activation_bits=16

A variant is `backend:key=value,...` with keys of mcad.export.options.Options (calib, keep_fp32 with
`+` between aliases, npu_activation_bits), and `calibration` for onnx: ONNX Runtime's activation
ranges (minmax | percentile | entropy), which the product fixes (mcad.export.backends.onnx.CALIBRATION)
and this study sets for its variant. One JSON line each: the runtime pair's R@1 delta and each
encoder's cosines and own verdict."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import fields

from mcad.export.backends import BY_NAME
from mcad.export.backends import onnx as onnx_backend
from mcad.export.options import Options
from mcad.export.pipeline import Exporter

TYPES = {f.name: f.type for f in fields(Options)}
CALIBRATIONS = ("minmax", "percentile", "entropy")


def parse_variant(text: str) -> tuple[str, dict, str | None]:
    """(target, Options keywords, ONNX Runtime calibration or None) of `backend:key=value,...`."""
    backend, _, rest = text.partition(":")
    if backend not in BY_NAME or backend == "hub":
        raise ValueError(f"{text}: unknown backend {backend!r}")
    target = BY_NAME[backend].targets[0]
    kw, calibration = {}, None
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key == "calibration" and backend == "onnx":
            if value not in CALIBRATIONS:
                raise ValueError(f"{text}: calibration={value}: expected one of {', '.join(CALIBRATIONS)}")
            calibration = value
            continue
        if key not in TYPES:
            raise ValueError(f"{text}: {key} is not an export option")
        kw[key] = value.replace("+", ",") if key == "keep_fp32" else int(value) if value.isdigit() else value
    return target, dict(kw, backends=(backend,)), calibration


def measure(run: str, text: str) -> dict:
    target, kw, calibration = parse_variant(text)
    t0 = time.perf_counter()
    product = onnx_backend.CALIBRATION
    try:
        if calibration is not None:
            onnx_backend.CALIBRATION = calibration
        with tempfile.TemporaryDirectory() as out:
            m = Exporter(Options(run=run, target=target, roles=("text", "image"), out=out, progress=False,
                                 **kw)).export()
    finally:
        onnx_backend.CALIBRATION = product
    c = m["parity"]
    (r,) = c["retrieval"].values()
    return {"variant": text, "fp32_i2t_r1": c["fp32"]["i2t_r1"], "fp32_t2i_r1": c["fp32"]["t2i_r1"],
            "d_i2t_r1": r["d_i2t_r1"], "d_t2i_r1": r["d_t2i_r1"], "pass": r["pass"],
            "cos": {k: [a["cos_mean"], a["cos_min"]] for k, a in c["artifacts"].items()},
            "own": {k: a["pass"] for k, a in c["artifacts"].items()},
            "seconds": round(time.perf_counter() - t0)}


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    for text in argv[1:]:
        print(json.dumps(measure(argv[0], text)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
