"""LiteRT (TFLite) int8 through LiteRT's PT2E quantizer, what runs on any Android CPU (and what
Qualcomm AI Hub compiles). Its search program is made with the gallery bound in (fp32), or with a
run-time gallery when asked for (common.RUN_GALLERY_SLOW), traced at FIXED_GALLERY rows."""
from __future__ import annotations

from mcad.export.backends.common import FIXED_GALLERY, Job
from mcad.export.programs import INPUT_NAMES, NAMES, SEARCH_K


def file_name(role: str, job: Job) -> str:
    return f"{NAMES[role]}.{job.opts.precision}.tflite"


def missing() -> str | None:
    return None  # litert-torch and ai-edge-litert are dependencies


def build(job: Job) -> None:
    from mcad.export.builders import build_tflite

    cores = job.cores("litert")
    progs = job.programs(cores, backend="tflite")
    job.skip_slow_search("tflite")
    for role in job.roles_for("tflite"):
        ex = job.bound_example(role, job.example(role, FIXED_GALLERY))
        run_gallery = role == "search" and len(ex) == 2
        quantizer = cores["text" if role == "search" else role][1]
        job.write(role, "tflite", lambda p, m=progs[role], e=ex, r=role, q=quantizer:
                  build_tflite(m, e, p, INPUT_NAMES[r][:len(e)], pt2e_quantizer=q),
                  job.bound_scheme(role, "tflite", job.pt2e_scheme("litert")),
                  gallery_rows=[SEARCH_K, None] if run_gallery else None,
                  note="traced with a fixed gallery; resize_tensor_input to any N >= 10" if run_gallery else None,
                  **job.bound_notes(role, "tflite"))
