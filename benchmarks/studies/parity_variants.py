"""Parity of quantization variants on a run's student: each variant's text and image encoders are
built by the export stage, run in their real runtime on the whole test split, and compared with
the eager fp32 student (the numbers behind benchmarks/results/parity.md):

    python benchmarks/studies/parity_variants.py runs/mcad-student onnx:onnx_calibration=minmax \
        onnx:onnx_calibration=percentile tflite_full:npu_activation_bits=8 tflite_full:npu_activation_bits=16

A variant is `backend:key=value,...` with keys of mcad.export.pipeline.Options (calib,
keep_fp32 with `+` between aliases, onnx_calibration, npu_activation_bits). One JSON line each."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import fields

from mcad.export.pipeline import PLAN, Exporter, Options

TYPES = {f.name: f.type for f in fields(Options)}


def parse_variant(text: str) -> tuple[str, dict]:
    backend, _, rest = text.partition(":")
    target = next((t for t, plan in PLAN.items() if backend in plan), None)
    if target is None:
        raise ValueError(f"{text}: unknown backend {backend!r}")
    kw = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in TYPES:
            raise ValueError(f"{text}: {key} is not an export option")
        kw[key] = value.replace("+", ",") if key == "keep_fp32" else int(value) if value.isdigit() else value
    return target, dict(kw, backends=(backend,))


def measure(run: str, text: str) -> dict:
    target, kw = parse_variant(text)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        e = Exporter(Options(run=run, target=target, roles=("text", "image"), out=out, progress=False, **kw))
        e.load_data()
        getattr(e, f"build_{kw['backends'][0]}")()
        e.run_artifacts()
        c = e.check()
    (r,) = c["retrieval"].values()
    return {"variant": text, "fp32_i2t_r1": c["fp32"]["i2t_r1"], "fp32_t2i_r1": c["fp32"]["t2i_r1"],
            "d_i2t_r1": r["d_i2t_r1"], "d_t2i_r1": r["d_t2i_r1"], "pass": r["pass"],
            "cos": {k: [a["cos_mean"], a["cos_min"]] for k, a in c["artifacts"].items()},
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
