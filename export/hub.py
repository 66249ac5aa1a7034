"""Qualcomm AI Hub: compile the int8 ONNX artifacts for a Snapdragon SoC (QNN context binaries
for the HTP) and download what it compiled. Needs credentials (`qai-hub configure --api_token`)
and network; nothing here runs without them."""
from __future__ import annotations

import logging
from pathlib import Path

from mcad.io import atomic_path

log = logging.getLogger("mcad.export")

# SoC -> AI Hub chipset attribute
HUB_CHIPSETS = {
    "SM8450": "qualcomm-snapdragon-8gen1",
    "SM8475": "qualcomm-snapdragon-8plus-gen1",
    "SM8550": "qualcomm-snapdragon-8gen2",
    "SM8650": "qualcomm-snapdragon-8gen3",
    "SM8750": "qualcomm-snapdragon-8-elite",
    "SM8850": "qualcomm-snapdragon-8-elite-gen5",
}
TARGET_RUNTIME = "qnn_context_binary"


def compile_on_hub(artifacts, out_dir: Path, soc: str, timeout: int = 1800):
    """Yield (source artifact, downloaded path, info) for each compiled ONNX artifact."""
    import qai_hub as hub

    chipset = HUB_CHIPSETS.get(soc.upper())
    if chipset is None:
        raise ValueError(f"soc={soc}: no AI Hub chipset known for it ({', '.join(HUB_CHIPSETS)})")
    device = hub.Device(attributes=f"chipset:{chipset}")
    jobs = []
    for art in artifacts:
        log.info("AI Hub: compiling %s for %s", art.path.name, chipset)
        job = hub.submit_compile_job(model=str(art.path), device=device, name=f"mcad-{art.path.stem}",
                                     options=f"--target_runtime {TARGET_RUNTIME}")
        jobs.append((art, job))
    for art, job in jobs:
        status = job.wait(timeout=timeout)
        if not getattr(status, "success", False):
            raise RuntimeError(f"AI Hub compile job {job.job_id} for {art.path.name}: "
                               f"{getattr(status, 'message', status)}")
        target = job.get_target_model()
        dest = out_dir / f"{art.path.stem}.{soc.lower()}.qnn_context.bin"
        with atomic_path(dest) as tmp:
            got = Path(target.download(str(tmp)))
            if got != tmp:
                got.replace(tmp)
        yield art, dest, {"hub_job": job.job_id, "chipset": chipset, "target_runtime": TARGET_RUNTIME}
