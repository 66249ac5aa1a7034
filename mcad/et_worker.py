"""ExecuTorch programs in a child process (`python -m mcad.et_worker`), driven by mcad.runtimes.

Why a child: tearing down a program whose XNNPACK delegate holds quantized partitions can abort
the process (free(): double free in executorch 1.4.1's pybindings), which must not take the
caller with it. The child keeps every program until it leaves with os._exit.

Protocol: length-prefixed pickles, requests on stdin, replies on the stdout the process started
with (its own prints go to stderr).
  ("load", key, path)   -> ("ok", {"inputs": [...], "outputs": [...]})   tensor specs
  ("run", key, runs)    -> ("ok", [[np.ndarray, ...], ...])              runs: list of input lists
  ("exit",)             -> the process leaves
A failure is ("error", "<Type>: <message>") and the worker stays up."""
from __future__ import annotations

import os
import pickle
import struct
import sys

SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32",
                7: "float64", 11: "bool", 15: "bfloat16"}
HEADER = struct.Struct("<Q")


def send(f, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(HEADER.pack(len(data)) + data)
    f.flush()


def receive(f):
    """The next message, or None at end of stream."""
    head = f.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (n,) = HEADER.unpack(head)
    data = f.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


def _dtype(t) -> str:
    dt = t.dtype()
    if isinstance(dt, int) or str(dt).isdigit():
        return SCALAR_TYPES.get(int(dt), str(dt))
    return str(dt).rsplit(".", 1)[-1]


def _spec(method) -> dict:
    meta = method.metadata

    def tensors(n, get):
        return [{"shape": list(get(i).sizes()), "dtype": _dtype(get(i))} for i in range(n)]

    return {"inputs": tensors(meta.num_inputs(), meta.input_tensor_meta),
            "outputs": tensors(meta.num_outputs(), meta.output_tensor_meta)}


def serve(inp, out) -> None:
    import numpy as np
    import torch
    from executorch.runtime import Runtime

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1") or 1))
    runtime = Runtime.get()
    programs: dict = {}  # key -> (program, method): never freed before the process exits
    while True:
        req = receive(inp)
        if req is None or req[0] == "exit":
            return
        try:
            if req[0] == "load":
                _, key, path = req
                program = runtime.load_program(str(path))
                method = program.load_method("forward")
                if method is None:
                    raise RuntimeError("program has no 'forward' method")
                programs[key] = (program, method)
                send(out, ("ok", _spec(method)))
            elif req[0] == "run":
                _, key, runs = req
                method = programs[key][1]
                outs = []
                for inputs in runs:
                    res = method.execute([torch.from_numpy(np.ascontiguousarray(x)) for x in inputs])
                    outs.append([r.detach().numpy().copy() for r in res])
                send(out, ("ok", outs))
            else:
                raise ValueError(f"unknown request {req[0]!r}")
        except Exception as e:  # the caller gets one line and may go on with other programs
            send(out, ("error", f"{type(e).__name__}: {e}".splitlines()[0][:500]))


def main() -> None:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # banners and prints must not corrupt the replies
    code = 0
    try:
        serve(sys.stdin.buffer, out)
    except Exception as e:
        print(f"mcad.et_worker: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    out.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
