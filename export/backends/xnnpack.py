"""ExecuTorch XNNPACK (the CPU delegate every target ships): PT2E int8 through the XNNPACK
quantizer, lowered to a .pte. Its search program scores `gallery @ q^T` (export.programs.SCANS) and
is made with the gallery bound in, or with a run-time gallery when asked for (common.RUN_GALLERY_SLOW)."""
from __future__ import annotations

from mcad.export.backends.common import MAX_GALLERY, Job
from mcad.export.programs import NAMES, SEARCH_K


def file_name(role: str, job: Job) -> str:
    return f"{NAMES[role]}.xnnpack.{job.opts.precision}.pte"


def missing() -> str | None:
    return None  # the executorch wheel holds it


def build(job: Job) -> None:
    from mcad.export.builders import build_xnnpack

    cores = job.cores("xnnpack")
    progs = job.programs(cores, scan="rows", backend="xnnpack")
    job.skip_slow_search("xnnpack")
    for role in job.roles_for("xnnpack"):
        ex = job.bound_example(role, job.example(role))
        run_gallery = role == "search" and len(ex) == 2
        dyn = job.dynamic() if run_gallery else None
        job.write(role, "xnnpack", lambda p, m=progs[role], e=ex, d=dyn, g=run_gallery:
                  build_xnnpack(m, e, p, dynamic_shapes=d, alloc_inputs=not g),
                  job.bound_scheme(role, "xnnpack", job.pt2e_scheme("xnnpack")),
                  gallery_rows=[SEARCH_K, MAX_GALLERY] if run_gallery else None,
                  **job.bound_notes(role, "xnnpack"))
