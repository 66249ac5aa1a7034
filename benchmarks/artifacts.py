"""Artifacts the bench measures that no `make export` made: the run's student while it has no
export, the mobile-size student config and the peers. Each variant (runtime x precision) is one
export by mcad.export (`Exporter` with the towers and calibration samples given: the quantizers,
builders and manifest of `make export`, parity off) into its own folder of a cache keyed by what
it is built from.

Each variant is built in its own process under a time limit (`build_timeout=`; a lowering pass
can run for tens of minutes); one that fails or runs over is listed under `skipped` with a
one-line reason, and remembered in the cache so the next bench does not try it again. A cached
variant whose files no longer match its manifest's sha256 is built again, never timed."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from mcad.artifacts import MANIFEST, ExportManifest, ManifestError, load_manifest
from mcad.io import read_json, versions, write_json

log = logging.getLogger("mcad.benchmarks")
BACKEND = {"onnxruntime": "onnx", "litert": "tflite", "executorch": "xnnpack"}
BUILD_TIMEOUT_S = 900.0  # per variant; `mcad bench build_timeout=S` (0: build in this process, no limit)
ARTIFACTS_VERSION = 4  # bump when what a variant holds changes (a new cache key: old folders are not read)
FAILED = "failed.json"


def cache_key(*parts) -> str:
    h = hashlib.sha256()
    h.update(str(ARTIFACTS_VERSION).encode())
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    v = versions()
    h.update(json.dumps({k: v.get(k) for k in ("torch", "executorch", "onnx", "onnxruntime", "litert-torch")},
                        sort_keys=True).encode())
    return h.hexdigest()[:12]


def export_variant(task: dict) -> Path:
    """One variant through mcad.export; returns its manifest path. task: out, runtime, precision,
    towers (None: the run's student), run, calib (quantize.calib.Samples)."""
    from mcad.export.pipeline import Exporter, Options

    towers = task["towers"]
    roles = tuple(r for r in ("text", "image") if towers is None or r in towers.roles)
    opts = Options(target="cpu", run=task["run"], out=task["out"], backends=(BACKEND[task["runtime"]],),
                   roles=roles, precision=task["precision"], parity=False, progress=False,
                   calib=max(1, len(task["calib"].ids)))
    Exporter(opts, towers=towers, calib=task["calib"]).export()
    return Path(task["out"]) / MANIFEST


def _in_subprocess(task: dict, timeout_s: float, work: Path) -> None:
    import torch

    job = work / f".task-{Path(task['out']).name}.pt"
    torch.save(task, job)
    try:
        proc = subprocess.run([sys.executable, "-m", "mcad.benchmarks.artifacts", str(job)], capture_output=True,
                              text=True, timeout=timeout_s, env=dict(os.environ, OMP_NUM_THREADS=str(env_threads())))
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"building took longer than {timeout_s:.0f} s (build_timeout=)") from None
    finally:
        job.unlink(missing_ok=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "")
        raise RuntimeError(err.strip()[:300] or f"exit {proc.returncode}")


def build_variants(folder: Path, runtimes: list[str], precisions: list[str], calib, towers=None,
                   run: Path | None = None, timeout_s: float | None = None
                   ) -> tuple[list[ExportManifest], list[dict]]:
    """(manifests, skipped) of every runtime x precision variant in `folder` (built when missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    timeout_s = BUILD_TIMEOUT_S if timeout_s is None else timeout_s
    failed = read_json(folder / FAILED) if (folder / FAILED).exists() else {}
    manifests, skipped = [], []
    for runtime in runtimes:
        for precision in precisions:
            variant = f"{BACKEND[runtime]}-{precision}"
            out = folder / variant
            if variant in failed:
                skipped.append({"artifact": f"{folder.name}/{variant}", "reason": failed[variant]})
                continue
            try:  # a cached variant is timed only if every file is the one its manifest recorded
                manifests.append(load_manifest(out, verify=True))
                continue
            except (FileNotFoundError, ManifestError) as e:
                if (out / MANIFEST).exists():  # damaged since it was built: it is only a cache, build it again
                    log.warning("%s; rebuilding this bench-made variant", str(e).split("; rebuild:")[0])
            task = {"out": str(out), "runtime": runtime, "precision": precision, "towers": towers,
                    "run": None if run is None else str(run), "calib": calib}
            try:
                if timeout_s:
                    _in_subprocess(task, timeout_s, folder)
                else:
                    export_variant(task)
                manifests.append(load_manifest(out, verify=True))
                log.info("built %s/%s", folder.name, variant)
            except Exception as e:  # one line per variant that did not make it, kept for the next bench
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
                log.warning("skipped %s/%s: %s", folder.name, variant, reason)
                skipped.append({"artifact": f"{folder.name}/{variant}", "reason": reason})
                failed[variant] = reason
                write_json(folder / FAILED, failed)
    return manifests, skipped


def random_ids(n: int, context_length: int, vocab: int, sot: int | None, eot: int, pad: int, seed: int = 0,
               lengths: list[int] | None = None) -> np.ndarray:
    """CLIP-style rows: [sot] tokens [eot] pad... (for models whose tokenizer is not available here)."""
    rng = np.random.default_rng(seed)
    out = np.full((n, context_length), pad, dtype=np.int64)
    hi = min(vocab, eot if eot > 0 else vocab) - 1
    for i in range(n):
        L = int(lengths[i % len(lengths)]) if lengths else int(rng.integers(6, 16))
        L = max(1, min(L, context_length - 2))
        start = 0
        if sot is not None:
            out[i, 0] = sot
            start = 1
        out[i, start:start + L] = rng.integers(3, max(4, hi), L)
        out[i, start + L] = eot
    return out


def env_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", "1") or 1)


if __name__ == "__main__":  # python -m mcad.benchmarks.artifacts TASK.pt (one variant, see _in_subprocess)
    import torch

    logging.basicConfig(level=logging.WARNING)
    export_variant(torch.load(sys.argv[1], weights_only=False))
