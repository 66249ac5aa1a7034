"""ExecuTorch QNN for the Qualcomm HTP of a Snapdragon SoC (`soc=`): PT2E through the QNN
quantizer, lowered to a .pte with the QNN SDK. The text encoder (and search program) is A8W8;
the image encoder A16W8 (npu_activation_bits=8: A8W8), which HTP runs natively: with 8-bit
activations its cosine to fp32 sits at the bar on real photos
(benchmarks/results/quant_sensitivity.md), and images are encoded when indexed, not per query.
The quantizer runs without the SDK: its eager (fake-quant) embeddings go into the parity record
as what HTP will do, even where the .pte cannot be made here."""
from __future__ import annotations

from pathlib import Path

import torch

from mcad.export.backends.common import FIXED_GALLERY, Job, eager_embed_b1
from mcad.export.programs import NAMES

SDK_MSG = ("the Qualcomm HTP artifact (ExecuTorch QNN .pte) needs the QNN SDK (Qualcomm AI Engine "
           "Direct / QAIRT): install it and set QNN_SDK_ROOT=/path/to/qairt/<version> (the folder "
           "with lib/x86_64-linux-clang/libQnnHtp.so)")


def file_name(role: str, job: Job) -> str:
    return f"{NAMES[role]}.qnn.{job.soc.lower()}.{job.opts.precision}.pte"


def missing() -> str | None:
    from mcad.quantize.pt2e import qnn_sdk_root

    return SDK_MSG if qnn_sdk_root() is None else None


def lower(module, example, out_path: Path, soc: str) -> None:
    """Lower a QNN-quantized program to the HTP of `soc` (needs a QNN SDK at $QNN_SDK_ROOT)."""
    from mcad.export.builders import quiet, to_pte
    from mcad.quantize.pt2e import qnn_chipset, qnn_import_guard

    with qnn_import_guard():
        from executorch.backends.qualcomm.utils.utils import (
            generate_htp_compiler_spec, generate_qnn_executorch_compiler_spec, to_edge_transform_and_lower_to_qnn)
    specs = generate_qnn_executorch_compiler_spec(soc_model=qnn_chipset(soc),
                                                  backend_options=generate_htp_compiler_spec(use_fp16=False))
    with quiet(), torch.no_grad():
        edge = to_edge_transform_and_lower_to_qnn(module, example, specs)
        to_pte(edge, out_path, True)


def quantizers(job: Job) -> dict[str, str]:
    """Per role: A8W8 text (and search); the image encoder A16W8 unless npu_activation_bits=8."""
    return {"text": "qnn", "search": "qnn", "image": "qnn16" if job.opts.npu_activation_bits == 16 else "qnn"}


def build(job: Job) -> None:
    q = quantizers(job)
    cores = job.cores("qnn", per_role={"image": q["image"]})
    progs = job.programs(cores)
    if job.opts.precision == "int8" and job.test is not None:
        x = {"text": torch.as_tensor(job.test.ids), "image": torch.as_tensor(job.test.pixels)}
        job.simulated[f"qnn-{job.soc.lower()}"] = {r: eager_embed_b1(progs[r], x[r])
                                                   for r in ("text", "image") if r in progs}
    reason = missing()
    if reason is not None:
        job.skip_all("qnn", reason)
        return
    for role in job.roles:
        ex = job.example(role, FIXED_GALLERY)
        job.write(role, "qnn", lambda p, m=progs[role], e=ex: lower(m, e, p, job.soc), job.pt2e_scheme(q[role]),
                  soc=job.soc, gallery_rows=FIXED_GALLERY if role == "search" else None)
