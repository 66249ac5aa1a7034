"""ONNX Runtime int8: the float program exported to ONNX, then ONNX Runtime's static QDQ
quantization (per-channel weights). Its search program takes the gallery as columns [D, N] (a
plain GEMM, export.programs.SCANS), any row count at run time."""
from __future__ import annotations

from mcad.export.backends.common import Job
from mcad.export.programs import INPUT_NAMES, NAMES, OUTPUT_NAMES, SEARCH_K

# How ONNX Runtime's activation ranges are taken (mcad.quantize.onnx_quant: percentile | minmax |
# entropy). Percentile ranges keep the parity bars where MinMax ones missed them on the default
# student (benchmarks/results/parity.md, made by benchmarks/studies/parity_variants.py, which sets
# this to compare them).
CALIBRATION = "percentile"


def file_name(role: str, job: Job) -> str:
    return f"{NAMES[role]}.{job.opts.precision}.onnx"


def missing() -> str | None:
    return None  # onnx, onnxscript and onnxruntime are dependencies


def scheme(job: Job, method: str) -> str:
    from mcad.quantize import onnx_quant, pt2e

    if job.opts.precision == "fp32":
        return "fp32 (not quantized)"
    return onnx_quant.scheme(pt2e.parse_keep(job.opts.keep_fp32, "onnx"), method)


def build(job: Job) -> None:
    from mcad.export.builders import build_onnx
    from mcad.quantize.onnx_quant import quantize_onnx

    progs = job.programs(job.float_cores(), scan="columns")  # the gallery input is [D, N]: see SCANS
    for role in job.roles:
        ex = job.example(role, layout="columns")
        dyn = job.dynamic("columns") if role == "search" else None
        used: dict = {}

        def lower(p, role=role, ex=ex, dyn=dyn, used=used):
            if job.opts.precision == "fp32":
                build_onnx(progs[role], ex, p, INPUT_NAMES[role], OUTPUT_NAMES[role], dynamic_shapes=dyn)
                return
            fp = p.with_name(p.name + ".fp32.onnx")
            try:
                build_onnx(progs[role], ex, fp, INPUT_NAMES[role], OUTPUT_NAMES[role], dynamic_shapes=dyn)
                used.update(quantize_onnx(fp, p, _calibration(job, role), job.opts.keep_fp32, method=CALIBRATION))
            finally:
                if fp.exists():
                    fp.unlink()

        art = job.write(role, "onnx", lower, scheme(job, CALIBRATION),
                        gallery_rows=[SEARCH_K, None] if role == "search" else None,
                        gallery_layout="columns" if role == "search" else None)
        if used.get("fallback"):  # the manifest says which ranges the artifact really has
            art.quantization = scheme(job, used["method"])
            art.notes["calibration_fallback"] = used["fallback"]


def _calibration(job: Job, role: str) -> dict:
    """The calibration inputs of a role's ONNX program, by input name."""
    if role == "image":
        return {"pixels": job.calib.pixels}
    if role == "text":
        return {"ids": job.calib.ids}
    return {"ids": job.calib.ids, "gallery": job.calib_gallery.T.copy()}
