"""Artifacts the benchmark makes itself, for models the export stage did not export (the mobile-size
student, the peers) or while no export exists yet: the same three runtimes, written with an export
manifest of the docs/interfaces.md format so the harness reads everything one way.

- onnxruntime: `torch.onnx.export(dynamo=True, opset 18)`; int8 = static QDQ, per channel
  (`quant_pre_process(skip_symbolic_shape=True)` + `quantize_static`), calibrated on the inputs given.
- executorch: XNNPACK lowering; int8 = PT2E with XNNPACKQuantizer (symmetric, per channel).
- litert: `litert_torch.convert`; int8 = litert_torch's PT2EQuantizer (static, per channel),
  prepared/calibrated/converted with torchao's PT2E, then lowered with `QuantConfig`.
For the DualEncoder towers (the run's student, student-mobile) int8 goes through the export stage's own
code first (mcad.quantize.pt2e.quantize_core + mcad.export.builders, mcad.quantize.onnx_quant: the
`make export` recipe, l2-normalize kept float); the recipes above are the fallback and what the peers get.
Each variant is built in its own process under a time limit (`build_timeout=`); a variant that fails
or runs over is listed under `skipped` with a one-line reason, never silently dropped.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from mcad.io import atomic_path, read_json, sha256_file, versions, write_json

log = logging.getLogger("mcad.benchmarks")
EXT = {"onnxruntime": "onnx", "litert": "tflite", "executorch": "pte"}
BACKEND = {"onnxruntime": "onnx", "litert": "tflite", "executorch": "xnnpack"}
QUANT_LABEL = {"fp32": "fp32", "int8": {"onnxruntime": "int8 static QDQ per-channel",
                                        "executorch": "int8 PT2E XNNPACK per-channel",
                                        "litert": "int8 PT2E static per-channel"}}


@contextlib.contextmanager
def quiet():
    """Exporters print progress bars and warnings by the screenful; keep the bench output readable."""
    buf = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(buf):
        warnings.simplefilter("ignore")
        prev = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(prev)


BUILD_TIMEOUT_S = 900.0  # per variant; `mcad bench build_timeout=S` (0: build in this process, no limit)
ARTIFACTS_VERSION = 3  # bump when what build_artifacts writes changes (invalidates build/bench-cache)


def cache_key(*parts) -> str:
    h = hashlib.sha256()
    h.update(str(ARTIFACTS_VERSION).encode())
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    v = versions()
    h.update(json.dumps({k: v.get(k) for k in ("torch", "executorch", "onnx", "onnxruntime", "litert-torch")},
                        sort_keys=True).encode())
    return h.hexdigest()[:12]


def _example(spec: dict):
    import torch

    name, shape, dtype = spec["name"], spec["shape"], spec["dtype"]
    if dtype == "int64":
        return torch.zeros(shape, dtype=torch.long)
    return torch.zeros(shape, dtype=torch.float32)


def export_onnx(module, example: tuple, path: Path, in_names: list[str], out_names: list[str]) -> None:
    import torch

    with quiet(), atomic_path(path) as tmp:
        try:
            torch.onnx.export(module, example, str(tmp), dynamo=True, opset_version=18, external_data=False,
                              input_names=in_names, output_names=out_names)
        except Exception as e:  # the legacy exporter still works for what dynamo refuses
            log.info("dynamo ONNX export failed (%s); legacy exporter", str(e).splitlines()[0][:120])
            torch.onnx.export(module, example, str(tmp), dynamo=False, opset_version=17,
                              input_names=in_names, output_names=out_names)
        _ = tmp.stat()


def quantize_onnx(fp32: Path, out: Path, calib: list[dict]) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            return next(self.it, None)

    pre = out.with_name(out.stem + ".pre.onnx")
    with quiet():
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        with atomic_path(out) as tmp:
            quantize_static(str(pre), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    pre.unlink(missing_ok=True)


def export_pte(module, example: tuple, path: Path, int8: bool, calib: list[tuple]) -> None:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with quiet():
        ep = torch.export.export(module, example)
        if int8:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer, get_symmetric_quantization_config)
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            q = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            m = prepare_pt2e(ep.module(), q)
            for c in calib:
                m(*c)
            m = convert_pt2e(m)
            ep = torch.export.export(m, example)
        prog = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
        with atomic_path(path) as tmp:
            tmp.write_bytes(prog.buffer)


def export_tflite(module, example: tuple, path: Path, int8: bool, calib: list[tuple]) -> None:
    with quiet():
        import litert_torch

        if int8:  # PT2E: prepare, calibrate, convert (no folding), then lower with the quantizer
            import torch
            from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
            from litert_torch.quantize.quant_config import QuantConfig
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            q = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
            m = prepare_pt2e(torch.export.export(module, example).module(), q)
            for c in calib:
                m(*c)
            m = convert_pt2e(m, fold_quantize=False)
            edge = litert_torch.convert(m, example, quant_config=QuantConfig(pt2e_quantizer=q))
        else:
            edge = litert_torch.convert(module, example)
        with atomic_path(path) as tmp:
            edge.export(str(tmp))


def _is_dual_tower(module) -> bool:
    return type(module).__name__ in ("TextEncoder", "ImageEncoder") and hasattr(module, "proj")


def build_with_export_stage(task: dict) -> str | None:
    """int8 of a DualEncoder tower (student, student-mobile) through the export stage's own code
    (mcad.quantize.pt2e.quantize_core + mcad.export.builders; its onnx_quant for ONNX): the same
    recipe as `make export` (l2-normalize kept float). Returns the recipe name, or None when the
    export stage does not apply / is not importable (then the bench's recipe is used)."""
    if task["quant"] != "int8" or not _is_dual_tower(task["module"]):
        return None
    try:
        from mcad.export import builders
        from mcad.quantize.pt2e import Normalized, quantize_core
    except Exception:  # the export stage is missing or broken: fall back
        return None
    import torch

    module, example, path = task["module"].eval(), task["example"], Path(task["path"])
    calib = torch.cat([c[0] for c in task["calib"]])
    runtime = task["runtime"]
    if runtime == "executorch":
        converted, _ = quantize_core(module, calib, "xnnpack")
        builders.build_xnnpack(Normalized(converted), example, path)
    elif runtime == "litert":
        converted, q = quantize_core(module, calib, "litert")
        builders.build_tflite(Normalized(converted), example, path, ["x"], pt2e_quantizer=q)  # Normalized.forward(x)
    elif runtime == "onnxruntime":
        from mcad.quantize.onnx_quant import quantize_onnx as export_quantize_onnx

        fp32 = Path(task["fp32_onnx"])
        if not fp32.exists():
            export_onnx(module, example, fp32, task["in_names"], task["out_names"])
        export_quantize_onnx(fp32, path, {task["in_names"][0]: calib.numpy()})
    else:
        return None
    return "export stage (mcad.quantize / mcad.export.builders)"


def build_variant(task: dict) -> str:
    """Write one artifact (task: module, example, calib, runtime, quant, path, names, fp32_onnx).
    Returns which recipe made it."""
    import torch

    module, example, cal = task["module"].eval(), task["example"], task["calib"]
    runtime, quant, path = task["runtime"], task["quant"], Path(task["path"])
    if task.get("use_export_stage", True):
        try:
            recipe = build_with_export_stage(task)
        except Exception as e:  # noqa: BLE001 - the export stage is work in progress: fall back, say so
            log.warning("export-stage recipe failed for %s (%s); bench recipe", path.name, str(e).splitlines()[0][:160])
            recipe = None
        if recipe:
            return recipe
    with torch.no_grad():
        if runtime == "onnxruntime":
            fp32 = Path(task["fp32_onnx"])
            if not fp32.exists():
                export_onnx(module, example, fp32, task["in_names"], task["out_names"])
            if quant == "int8":
                feeds = [{n: t.numpy() for n, t in zip(task["in_names"], c)} for c in cal]
                quantize_onnx(fp32, path, feeds)
        elif runtime == "executorch":
            export_pte(module, example, path, quant == "int8", cal)
        elif runtime == "litert":
            export_tflite(module, example, path, quant == "int8", cal)
        else:
            raise ValueError(f"unknown runtime {runtime!r}")
    return "bench (mcad.benchmarks.artifacts)"


def _build_in_subprocess(task: dict, timeout_s: float, work: Path) -> str:
    """build_variant in a fresh process with a time limit (a lowering pass can run for tens of minutes)."""
    import subprocess
    import sys

    import torch

    job = work / f".task-{Path(task['path']).name}.pt"
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
    recipe = [ln[len("RECIPE "):] for ln in proc.stdout.splitlines() if ln.startswith("RECIPE ")]
    return recipe[-1] if recipe else "?"


def build_artifacts(out_dir: Path, encoders: dict, runtimes: list[str], quants: list[str], meta: dict,
                    calib: dict[str, list[tuple]], timeout_s: float | None = None) -> Path:
    """encoders: {name: (module, role, inputs spec list, outputs spec list)}; writes files + manifest.json.
    Returns the manifest path. Re-uses a complete manifest already there (the folder name is a hash).
    With `timeout_s`, each variant is built in its own process and skipped when it runs over."""
    out_dir = Path(out_dir)
    man = out_dir / "manifest.json"
    if man.exists():
        return man
    out_dir.mkdir(parents=True, exist_ok=True)
    timeout_s = BUILD_TIMEOUT_S if timeout_s is None else timeout_s
    arts, skipped = [], []
    for name, (module, role, ins, outs) in encoders.items():
        module = module.eval()
        example = tuple(_example(s) for s in ins)
        cal = calib.get(name) or [example]
        in_names, out_names = [s["name"] for s in ins], [s["name"] for s in outs]
        fp32_onnx = out_dir / f"{name}.onnx.fp32.onnx"
        for runtime in runtimes:
            for quant in quants:
                path = out_dir / f"{name}.{BACKEND[runtime]}.{quant}.{EXT[runtime]}"
                if runtime == "onnxruntime" and quant == "fp32":
                    path = fp32_onnx
                label = f"{name} {runtime} {quant}"
                task = {"module": module, "example": example, "calib": cal, "runtime": runtime, "quant": quant,
                        "path": str(path), "in_names": in_names, "out_names": out_names, "fp32_onnx": str(fp32_onnx)}
                try:
                    if timeout_s:
                        recipe = _build_in_subprocess(task, timeout_s, out_dir)
                    else:
                        recipe = build_variant(task)
                    if not path.exists():
                        raise RuntimeError("no file written")
                except Exception as e:  # one line per variant that did not make it
                    reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
                    log.warning("skipped %s: %s", label, reason)
                    skipped.append({"artifact": f"{name}.{runtime}.{quant}", "reason": reason})
                    continue
                a_ins = [dict(s) for s in ins]
                if runtime == "litert":  # litert_torch narrows int64 model I/O to int32
                    for s in a_ins:
                        if s["dtype"] == "int64":
                            s["dtype"] = "int32"
                arts.append({"name": name, "role": role, "runtime": runtime, "backend": BACKEND[runtime],
                             "file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path),
                             "quantization": quant if quant == "fp32" else (
                                 QUANT_LABEL["int8"][runtime] if not recipe.startswith("export stage")
                                 else f"int8 {runtime} via the export stage's recipe (l2-normalize float)"),
                             "inputs": a_ins, "outputs": outs, "recipe": recipe})
                log.info("built %s (%.1f MB)", label, path.stat().st_size / 1e6)
    manifest = {"target": meta.get("target", "bench"), **meta, "artifacts": arts, "skipped": skipped,
                "made_by": "mcad.benchmarks.artifacts (bench-made; not the export stage)", "versions": versions()}
    write_json(man, manifest)
    return man


def load_or_none(path: Path) -> dict | None:
    try:
        return read_json(path)
    except (FileNotFoundError, ValueError):
        return None


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


if __name__ == "__main__":  # python -m mcad.benchmarks.artifacts TASK.pt (one variant, see _build_in_subprocess)
    import sys

    import torch

    logging.basicConfig(level=logging.WARNING)
    made_by = build_variant(torch.load(sys.argv[1], weights_only=False))
    print(f"RECIPE {made_by}", flush=True)
