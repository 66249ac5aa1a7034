"""Run an artifact in its real runtime: ONNX Runtime, the LiteRT interpreter (ai_edge_litert, with
the tflite_runtime fallback), ExecuTorch's Python runtime (in a child process, see et_worker).

Every runner takes a list of input lists (numpy, the shipped dtypes: ids int64, pixels/gallery
float32) and returns a list of output lists as float32/int64 numpy: quantized int8 outputs are
dequantized, int32 indices widened, so parity code sees one contract for every backend."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

NP_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.int64): "int64", np.dtype(np.int32): "int32",
             np.dtype(np.int8): "int8", np.dtype(np.uint8): "uint8", np.dtype(np.float16): "float16"}


def _threads() -> int:
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


# -- ONNX Runtime ----------------------------------------------------------------------------------
def run_onnx(path: str | Path, runs: list[list[np.ndarray]]) -> tuple[list[list[np.ndarray]], dict]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = _threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    outs = [[np.asarray(o) for o in sess.run(None, dict(zip(names, inputs)))] for inputs in runs]

    def spec(x):
        dt = x.type.replace("tensor(", "").rstrip(")").replace("float", "float32").replace("float3232", "float32")
        dt = {"double": "float64"}.get(dt, dt)
        return {"name": x.name, "shape": [d if isinstance(d, int) else "N" for d in x.shape], "dtype": dt}

    meta = {"inputs": [spec(x) for x in sess.get_inputs()], "outputs": [spec(x) for x in sess.get_outputs()]}
    return outs, meta


# -- LiteRT ----------------------------------------------------------------------------------------
def litert_interpreter(path: str | Path):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # older installs: the same interpreter under its old name
        from tflite_runtime.interpreter import Interpreter  # type: ignore
    return Interpreter(model_path=str(path), num_threads=_threads())


def _quant(d: dict) -> tuple[float, int] | None:
    scale, zp = d.get("quantization", (0.0, 0))
    if d["dtype"] in (np.int8, np.uint8, np.int16) and scale:
        return float(scale), int(zp)
    return None


def run_tflite(path: str | Path, runs: list[list[np.ndarray]], names: list[str] | None = None
               ) -> tuple[list[list[np.ndarray]], dict]:
    """`names`: the program's argument names, in the order `runs` gives the inputs (the signature
    lists them alphabetically)."""
    it = litert_interpreter(path)
    sig = it.get_signature_list()
    if sig:  # signature order is the program's argument order; tensor order may differ
        key = next(iter(sig))
        runner = it.get_signature_runner(key)
        in_d, out_d = runner.get_input_details(), runner.get_output_details()
        order = names if names and set(names) == set(sig[key]["inputs"]) else sig[key]["inputs"]
        ins = [dict(in_d[n], name=n) for n in order]
        outs_d = [dict(out_d[n], name=n) for n in sig[key]["outputs"]]
        del runner  # it holds views into the interpreter, which would block resizing
    else:
        ins, outs_d = it.get_input_details(), it.get_output_details()
    allocated: tuple | None = None
    results = []
    for inputs in runs:
        shapes = tuple(tuple(x.shape) for x in inputs)
        if shapes != allocated:
            for d, x in zip(ins, inputs):
                if tuple(d["shape"]) != tuple(x.shape):
                    it.resize_tensor_input(d["index"], list(x.shape), strict=False)
            it.allocate_tensors()
            allocated = shapes
        for d, x in zip(ins, inputs):
            q = _quant(d)
            if q is not None:
                info = np.iinfo(d["dtype"])
                x = np.clip(np.round(x / q[0]) + q[1], info.min, info.max)
            it.set_tensor(d["index"], np.ascontiguousarray(x.astype(d["dtype"])))
        it.invoke()
        row = []
        for d in outs_d:
            y = it.get_tensor(d["index"]).copy()
            q = _quant(d)
            if q is not None:
                y = (y.astype(np.float32) - q[1]) * q[0]
            elif y.dtype == np.int32:
                y = y.astype(np.int64)
            row.append(y)
        results.append(row)

    def spec(d):
        shape = [int(s) if s >= 0 else "N" for s in d.get("shape_signature", d["shape"])]
        out = {"name": d["name"], "shape": shape, "dtype": NP_DTYPES.get(np.dtype(d["dtype"]), str(d["dtype"]))}
        q = _quant(d)
        if q is not None:
            out["quantization"] = {"scale": q[0], "zero_point": q[1]}
        return out

    return results, {"inputs": [spec(d) for d in ins], "outputs": [spec(d) for d in outs_d]}


# -- ExecuTorch ------------------------------------------------------------------------------------
def run_executorch_many(jobs: dict[str, tuple[str | Path, list[list[np.ndarray]]]],
                        timeout: float | None = None) -> dict[str, tuple[list[list[np.ndarray]], dict]]:
    """Run several .pte programs in one child process; {key: (outputs, meta)}. Raises RuntimeError
    naming the program when one fails to load or run."""
    if not jobs:
        return {}
    with tempfile.TemporaryDirectory(prefix="mcad-et-") as tmp:
        job_p, out_p = Path(tmp) / "job.pkl", Path(tmp) / "out.pkl"
        with open(job_p, "wb") as f:
            pickle.dump({k: (str(p), r) for k, (p, r) in jobs.items()}, f, protocol=pickle.HIGHEST_PROTOCOL)
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.run([sys.executable, "-m", "mcad.export.et_worker", str(job_p), str(out_p)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        if not out_p.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            raise RuntimeError(f"ExecuTorch runtime process died (exit {proc.returncode}): {' | '.join(tail)}")
        with open(out_p, "rb") as f:
            res = pickle.load(f)
    if "__error__" in res:
        raise RuntimeError(f"ExecuTorch runtime: {res['__error__']}")
    out = {}
    for key, r in res.items():
        if "error" in r:
            raise RuntimeError(f"{jobs[key][0]}: ExecuTorch could not run it ({r['error']})")
        outs = [[np.asarray(y).astype(np.int64) if np.asarray(y).dtype == np.int32 else np.asarray(y) for y in row]
                for row in r["outputs"]]
        out[key] = (outs, r.get("meta", {}))
    return out


RUNNERS = {"onnxruntime": run_onnx, "litert": run_tflite}


def run_artifact(runtime: str, path: str | Path, runs: list[list[np.ndarray]], names: list[str] | None = None):
    if runtime == "executorch":
        return run_executorch_many({"p": (path, runs)})["p"]
    if runtime == "litert":
        return run_tflite(path, runs, names)
    if runtime not in RUNNERS:
        raise ValueError(f"no runner for runtime {runtime!r}")
    return RUNNERS[runtime](path, runs)
