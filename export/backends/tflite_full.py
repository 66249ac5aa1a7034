"""Full-integer TFLite for NPU delegates (dimensity: NeuroPilot, NNAPI): the float program converted
with int32 I/O, then ai_edge_quantizer's static recipe, A16W8 (int8 weights, int16 activations) or
A8W8 (`npu_activation_bits=8`, for NPUs that take 8-bit activations only). The L2 normalisation
(and the search program's scan and top-k) stay float."""
from __future__ import annotations

import numpy as np

from mcad.export.backends.common import FIXED_GALLERY, Job
from mcad.export.programs import INPUT_NAMES, NAMES, SEARCH_K

# TFLite tensor names of ops that sit directly in the program wrapper (not in its encoder core)
WRAPPER_OPS = r"^mcad\.export\.programs\.[A-Za-z]+(;|$)"


def file_name(role: str, job: Job) -> str:
    if job.opts.precision != "int8":
        return f"{NAMES[role]}.{job.opts.precision}.tflite"
    return f"{NAMES[role]}.full_{job.opts.npu_scheme}.tflite"


def missing() -> str | None:
    return None  # litert-torch and ai-edge-quantizer are dependencies


def scheme(job: Job) -> str:
    from mcad.quantize import pt2e, tflite_quant

    if job.opts.precision == "fp32":
        return "fp32 (not quantized)"
    return tflite_quant.scheme(pt2e.parse_keep(job.opts.keep_fp32, "tflite_full"), job.opts.npu_activation_bits)


def build(job: Job) -> None:
    progs = job.programs(job.float_cores())
    job.skip_slow_search("tflite_full")
    for role in job.roles_for("tflite_full"):
        ex = job.example(role, FIXED_GALLERY)
        job.write(role, "tflite_full", lambda p, m=progs[role], r=role, e=ex: _lower(job, m, r, e, p), scheme(job),
                  gallery_rows=[SEARCH_K, None] if role == "search" else None,
                  note="traced with a fixed gallery; resize_tensor_input to any N >= 10" if role == "search" else None)


def _lower(job: Job, program, role: str, example, path) -> None:
    from mcad.export.builders import build_tflite
    from mcad.quantize.tflite_quant import full_integer

    if job.opts.precision == "fp32":
        build_tflite(program, example, path, INPUT_NAMES[role], x64=False)
        return
    fp = path.with_name(path.name + ".fp32.tflite")
    try:
        build_tflite(program, example, fp, INPUT_NAMES[role], x64=False)  # int32 ids for NPUs
        ids = job.calib.ids.astype(np.int32)
        calib = {"text": {"ids": ids}, "image": {"pixels": job.calib.pixels}, "search": {"ids": ids}}[role]
        gallery = np.resize(job.calib_gallery, (FIXED_GALLERY, job.towers.embed_dim)) if role == "search" else None
        # the L2 normalisation (and the search tail) stays float: same query embedding in the text
        # encoder and the search program, and no int8 rounding of the output
        full_integer(fp, path, calib, job.opts.keep_fp32, float_regex=WRAPPER_OPS,
                     activation_bits=job.opts.npu_activation_bits,
                     fixed={"gallery": gallery} if role == "search" else None)
    finally:
        if fp.exists():
            fp.unlink()
