"""Qualcomm AI Hub (hub=1, snapdragon): compile this export's int8 ONNX artifacts for the SoC (QNN
context binaries for the HTP) and download what it compiled. Needs credentials (`qai-hub configure
--api_token`) and network; a failed compile is a skip with its reason (an error under strict=1)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from mcad.export.backends import onnx
from mcad.export.backends.common import Built, Job
from mcad.io import atomic_path

log = logging.getLogger("mcad.export")

MSG = ("hub=1 needs Qualcomm AI Hub credentials and network: run `.venv/bin/qai-hub configure "
       "--api_token <token>` (writes ~/.qai_hub/client.ini)")
# SoC -> AI Hub chipset attribute
CHIPSETS = {
    "SM8450": "qualcomm-snapdragon-8gen1",
    "SM8475": "qualcomm-snapdragon-8plus-gen1",
    "SM8550": "qualcomm-snapdragon-8gen2",
    "SM8650": "qualcomm-snapdragon-8gen3",
    "SM8750": "qualcomm-snapdragon-8-elite",
    "SM8850": "qualcomm-snapdragon-8-elite-gen5",
}
TARGET_RUNTIME = "qnn_context_binary"


def file_name(role: str, job: Job) -> str:
    """What AI Hub's compile of the role's ONNX artifact is saved as."""
    return f"{Path(onnx.file_name(role, job)).stem}.{job.soc.lower()}.qnn_context.bin"


def configured() -> bool:
    return (Path.home() / ".qai_hub" / "client.ini").exists() or bool(os.environ.get("QAIHUB_CLIENT_INI"))


def missing() -> str | None:
    return None if configured() else MSG


def compile_on_hub(artifacts: list[Built], job: Job, timeout: int = 1800):
    """Yield (source artifact, downloaded path, info) for each compiled ONNX artifact."""
    import qai_hub as hub

    chipset = CHIPSETS.get(job.soc.upper())
    if chipset is None:
        raise ValueError(f"soc={job.soc}: no AI Hub chipset known for it ({', '.join(CHIPSETS)})")
    device = hub.Device(attributes=f"chipset:{chipset}")
    jobs = []
    for art in artifacts:
        log.info("AI Hub: compiling %s for %s", art.path.name, chipset)
        submitted = hub.submit_compile_job(model=str(art.path), device=device, name=f"mcad-{art.path.stem}",
                                           options=f"--target_runtime {TARGET_RUNTIME}")
        jobs.append((art, submitted))
    for art, submitted in jobs:
        status = submitted.wait(timeout=timeout)
        if not getattr(status, "success", False):
            raise RuntimeError(f"AI Hub compile job {submitted.job_id} for {art.path.name}: "
                               f"{getattr(status, 'message', status)}")
        target = submitted.get_target_model()
        dest = job.out / file_name(art.role, job)
        with atomic_path(dest) as tmp:
            got = Path(target.download(str(tmp)))
            if got != tmp:
                got.replace(tmp)
        yield art, dest, {"hub_job": submitted.job_id, "chipset": chipset, "target_runtime": TARGET_RUNTIME}


def build(job: Job) -> None:
    if not configured():
        job.skip("qai-hub compiled assets", MSG)
        return
    sources = [a for a in job.artifacts if a.backend == "onnx"]
    try:
        for art, path, info in compile_on_hub(sources, job):
            job.artifacts.append(Built(art.role, "qnn", "qnn", path, art.quantization + "; compiled by Qualcomm AI Hub",
                                       dict(info, group="hub", source=art.path.name)))
    except Exception as e:  # network, credentials, quota: say so, keep the local artifacts
        if job.opts.strict:
            raise RuntimeError(f"hub=1: Qualcomm AI Hub compile failed ({type(e).__name__}: {e})") from None
        job.skip("qai-hub compiled assets", f"Qualcomm AI Hub compile failed: {type(e).__name__}: {e}")
