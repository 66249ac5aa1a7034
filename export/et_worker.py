"""Run .pte programs in ExecuTorch's Python runtime, in a child process.

`python -m mcad.export.et_worker JOB.pkl OUT.pkl`: JOB holds {key: (pte path, [inputs, ...])}
with numpy inputs; OUT gets {key: {"outputs": [[np.ndarray, ...], ...], "meta": {...}} or
{"error": "..."}}. The child leaves with os._exit once OUT is written: tearing down a program
whose XNNPACK delegate holds quantized partitions can abort the process (free(): double free
in executorch 1.4.1's pybindings), which must not take the caller with it."""
from __future__ import annotations

import os
import pickle
import sys


SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
                7: "float64", 11: "bool", 15: "bfloat16"}


def _meta(method_meta) -> dict:
    def tensors(n, get):
        out = []
        for i in range(n):
            t = get(i)
            dt = t.dtype()
            dt = SCALAR_TYPES.get(int(dt), str(dt)) if isinstance(dt, int) or str(dt).isdigit() else str(dt).rsplit(".", 1)[-1]
            out.append({"shape": list(t.sizes()), "dtype": dt})
        return out

    return {"inputs": tensors(method_meta.num_inputs(), method_meta.input_tensor_meta),
            "outputs": tensors(method_meta.num_outputs(), method_meta.output_tensor_meta)}


def run(job: dict) -> dict:
    import numpy as np
    import torch
    from executorch.runtime import Runtime

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    rt = Runtime.get()
    keep = []  # never let a program be freed before the process exits
    results = {}
    for key, (path, runs) in job.items():
        try:
            program = rt.load_program(path)
            method = program.load_method("forward")
            keep.append((program, method))
            outs = []
            for inputs in runs:
                res = method.execute([torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
                outs.append([r.detach().numpy().copy() for r in res])
            meta = {}
            try:
                meta = _meta(method.metadata)
            except Exception as e:  # metadata is informative only
                meta = {"error": str(e)}
            results[key] = {"outputs": outs, "meta": meta}
        except Exception as e:
            results[key] = {"error": f"{type(e).__name__}: {e}"}
    return results


def main() -> None:
    job_path, out_path = sys.argv[1], sys.argv[2]
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    code = 0
    try:
        results = run(job)
    except Exception as e:
        results = {"__error__": f"{type(e).__name__}: {e}"}
        code = 1
    with open(out_path, "wb") as f:
        pickle.dump(results, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
