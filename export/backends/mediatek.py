"""ExecuTorch MediaTek for the APU of a Dimensity platform (`soc=mt6989|...`): PT2E int8 through
the NeuroPilot quantizer (A8W8), lowered to a .pte; needs the NeuroPilot SDK's mtk_converter and
mtk_neuron, which no registry ships."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from mcad.export.backends.common import FIXED_GALLERY, Job
from mcad.export.programs import NAMES

PLATFORMS = ("mt6989", "mt6991", "mt6993")
SDK_MSG = ("the MediaTek APU artifact (ExecuTorch MediaTek .pte) needs the NeuroPilot SDK's Python "
           "packages mtk_converter and mtk_neuron: pip install the wheels from the NeuroPilot "
           "Express SDK into .venv")


def file_name(role: str, job: Job) -> str:
    return f"{NAMES[role]}.mediatek.{job.soc.lower()}.{job.opts.precision}.pte"


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("mtk_converter", "mtk_neuron"))


def missing() -> str | None:
    return None if available() else SDK_MSG


def quantizer():
    from executorch.backends.mediatek import NeuropilotQuantizer, Precision

    q = NeuropilotQuantizer()
    q.setup_precision(Precision.A8W8)
    return q


def lower(module, example, out_path: Path, platform: str = "mt6989") -> None:
    """Lower a NeuroPilot-quantized program for a Dimensity APU (needs mtk_converter/mtk_neuron)."""
    from executorch.backends.mediatek import NeuropilotPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.backend.compile_spec_schema import CompileSpec

    from mcad.export.builders import quiet, to_pte

    with quiet(), torch.no_grad():
        ep = torch.export.export(module, example)
        part = NeuropilotPartitioner([CompileSpec("platform-config", platform.encode())])
        edge = to_edge_transform_and_lower(ep, partitioner=[part])
        to_pte(edge, out_path, True)


def _cores(job: Job) -> dict:
    """The needed encoders' cores, calibrated through the NeuroPilot quantizer."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from mcad.quantize.pt2e import Core, as_quantizer, batches, parse_keep

    cores = {}
    calib = {"text": job.calib.ids, "image": job.calib.pixels}
    for r in job.needed():
        x = calib[r]
        core = Core(job.encoders[r]).eval()
        gm = torch.export.export(core, (torch.as_tensor(x[:1]),)).module()
        prepared = prepare_pt2e(gm, as_quantizer(quantizer(), parse_keep(job.opts.keep_fp32, "mediatek")))
        with torch.no_grad():
            for b in batches(x):
                prepared(b)
        cores[r] = (convert_pt2e(prepared), None)
    return cores


def build(job: Job) -> None:
    reason = missing()
    if reason is not None:
        job.skip_all("mediatek", reason)
        return
    progs = job.programs(_cores(job))
    platform = job.soc.lower()
    for role in job.roles:
        ex = job.example(role, FIXED_GALLERY)
        job.write(role, "mediatek", lambda p, m=progs[role], e=ex: lower(m, e, p, platform),
                  "int8 PT2E static (NeuroPilot quantizer A8W8)", platform=platform,
                  gallery_rows=FIXED_GALLERY if role == "search" else None)
