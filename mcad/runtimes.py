"""Open an exported artifact on this machine and run it: ONNX Runtime, the LiteRT interpreter
(ai_edge_litert, or tflite_runtime under its old name), ExecuTorch (in a child process, see
mcad.et_worker). The export's parity checks and search's artifact encoders both run artifacts
through here.

One contract for every runtime: each input is cast to the dtype the program declares (float
values fed to an integer TFLite input are quantized with its scale and zero point); outputs come
back as numpy with int8 outputs dequantized and int32 widened to int64.

The runner pushed to phones (mcad.device.runner) carries its own small copy of this, because it
runs where the package is not installed; tests/test_device.py runs both on the same artifacts."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HOST_RUNTIMES = ("onnxruntime", "litert", "executorch")
SUFFIX_RUNTIME = {".onnx": "onnxruntime", ".tflite": "litert", ".pte": "executorch"}
ONNX_DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
               "tensor(bool)": "bool"}


def default_threads() -> int:
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def _dims(shape) -> list:
    """Runtime-reported dims -> ints, "N" where the dimension is dynamic."""
    return [int(d) if isinstance(d, (int, np.integer)) and d >= 0 else "N" for d in shape]


def _scale(spec: dict) -> tuple[float, int] | None:
    q = spec.get("quantization")
    return (float(q["scale"]), int(q["zero_point"])) if q and q.get("scale") else None


class Closing:
    """`with` closes it: sessions and the ExecuTorch worker hold runtimes and child processes."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class Session(Closing):
    """One opened artifact. `inputs`/`outputs`: [{"name", "shape", "dtype"[, "quantization"]}]."""
    runtime = ""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.inputs: list[dict] = []
        self.outputs: list[dict] = []

    def spec(self) -> dict:
        return {"inputs": [dict(s) for s in self.inputs], "outputs": [dict(s) for s in self.outputs]}

    def prepare(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"{self.path}: takes {len(self.inputs)} input(s), got {len(inputs)}")
        out = []
        for x, s in zip(inputs, self.inputs):
            x = np.asarray(x)
            q = _scale(s)
            if q is not None and np.issubdtype(x.dtype, np.floating):
                info = np.iinfo(np.dtype(s["dtype"]))
                x = np.clip(np.round(x / q[0]) + q[1], info.min, info.max)
            out.append(np.ascontiguousarray(x.astype(s["dtype"], copy=False)))
        return out

    def finish(self, outputs) -> list[np.ndarray]:
        res = []
        for i, y in enumerate(outputs):
            y = np.asarray(y)
            q = _scale(self.outputs[i]) if i < len(self.outputs) else None
            if q is not None and np.issubdtype(y.dtype, np.integer):
                y = (y.astype(np.float32) - q[1]) * q[0]
            elif y.dtype == np.int32:
                y = y.astype(np.int64)
            res.append(y)
        return res

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return self.finish(self._run(self.prepare(inputs)))

    def run_many(self, runs: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
        return [self.run(x) for x in runs]

    def _run(self, inputs: list[np.ndarray]):  # pragma: no cover - abstract
        raise NotImplementedError


# -- ONNX Runtime ----------------------------------------------------------------------------------
class OnnxSession(Session):
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int):
        super().__init__(path)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

        def spec(x):
            return {"name": x.name, "shape": _dims(x.shape), "dtype": ONNX_DTYPES.get(x.type, x.type)}

        self.inputs = [spec(x) for x in self.sess.get_inputs()]
        self.outputs = [spec(x) for x in self.sess.get_outputs()]

    def _run(self, inputs):
        return self.sess.run(None, {s["name"]: x for s, x in zip(self.inputs, inputs)})


# -- LiteRT ----------------------------------------------------------------------------------------
def litert_interpreter(path: str | Path, threads: int | None = None):
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # older installs: the same interpreter under its old name
        from tflite_runtime.interpreter import Interpreter  # type: ignore
    return Interpreter(model_path=str(path), num_threads=threads or default_threads())


class LiteRTSession(Session):
    """`names`: the program's argument names in the order inputs are given (a signature lists them
    alphabetically, and tensor order may differ from both)."""
    runtime = "litert"

    def __init__(self, path: Path, threads: int, names: list[str] | None = None):
        super().__init__(path)
        it = self.it = litert_interpreter(path, threads)
        sig = it.get_signature_list()
        if sig:
            key = next(iter(sig))
            runner = it.get_signature_runner(key)
            in_d, out_d = runner.get_input_details(), runner.get_output_details()
            order = names if names and set(names) == set(sig[key]["inputs"]) else sig[key]["inputs"]
            self._in = [dict(in_d[n], name=n) for n in order]
            self._out = [dict(out_d[n], name=n) for n in sig[key]["outputs"]]
            del runner  # it holds views into the interpreter, which would block resizing
        else:
            self._in, self._out = it.get_input_details(), it.get_output_details()
        self._shapes: tuple | None = None
        self.inputs = [self._spec(d) for d in self._in]
        self.outputs = [self._spec(d) for d in self._out]

    @staticmethod
    def _spec(d: dict) -> dict:
        dtype = np.dtype(d["dtype"])
        out = {"name": d["name"], "shape": _dims(d.get("shape_signature", d["shape"])), "dtype": dtype.name}
        scale, zp = d.get("quantization", (0.0, 0))
        if np.issubdtype(dtype, np.integer) and scale:
            out["quantization"] = {"scale": float(scale), "zero_point": int(zp)}
        return out

    def _run(self, inputs):
        shapes = tuple(x.shape for x in inputs)
        if shapes != self._shapes:  # resize every input to what is fed, then re-plan memory
            for d, x in zip(self._in, inputs):
                self.it.resize_tensor_input(d["index"], list(x.shape), strict=False)
            self.it.allocate_tensors()
            self._shapes = shapes
        for d, x in zip(self._in, inputs):
            self.it.set_tensor(d["index"], x)
        self.it.invoke()
        return [self.it.get_tensor(d["index"]).copy() for d in self._out]


# -- ExecuTorch ------------------------------------------------------------------------------------
class ExecuTorchWorker(Closing):
    """One child process (mcad.et_worker) holding any number of programs; started on first use."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or default_threads()
        self.proc: subprocess.Popen | None = None
        self._n = 0

    def _start(self) -> None:
        self._err = tempfile.TemporaryFile()
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads))
        self.proc = subprocess.Popen([sys.executable, "-m", "mcad.et_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, env=env)

    def call(self, *request):
        from mcad.et_worker import receive, send

        if self.proc is None:
            self._start()
        try:
            send(self.proc.stdin, request)
            reply = receive(self.proc.stdout)
        except (BrokenPipeError, OSError):
            reply = None
        if reply is None:
            self._err.seek(0)
            tail = self._err.read().decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"ExecuTorch runtime process died (exit {self.proc.wait()}): {' | '.join(tail)}")
        if reply[0] == "error":
            raise RuntimeError(reply[1])
        return reply[1]

    def load(self, path: Path) -> tuple[str, dict]:
        self._n += 1
        key = str(self._n)
        return key, self.call("load", key, str(path))

    def close(self) -> None:
        if self.proc is None:
            return
        try:
            from mcad.et_worker import send

            send(self.proc.stdin, ("exit",))
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self._err.close()
        self.proc = None


class ExecuTorchSession(Session):
    runtime = "executorch"

    def __init__(self, path: Path, threads: int, names: list[str] | None = None,
                 worker: ExecuTorchWorker | None = None):
        super().__init__(path)
        self.own = worker is None
        self.worker = worker or ExecuTorchWorker(threads)
        try:
            self.key, spec = self.worker.load(path)
        except RuntimeError as e:
            self.close()
            raise RuntimeError(f"{path}: ExecuTorch could not load it ({e})") from None
        names = list(names or [])
        self.inputs = [dict(s, name=names[i] if i < len(names) else f"input{i}") for i, s in enumerate(spec["inputs"])]
        self.outputs = [dict(s, name=f"output{i}") for i, s in enumerate(spec["outputs"])]

    def run_many(self, runs):
        try:
            outs = self.worker.call("run", self.key, [self.prepare(x) for x in runs])
        except RuntimeError as e:
            raise RuntimeError(f"{self.path}: ExecuTorch could not run it ({e})") from None
        return [self.finish(o) for o in outs]

    def run(self, inputs):
        return self.run_many([inputs])[0]

    def close(self) -> None:
        if self.own:
            self.worker.close()


# -- any -------------------------------------------------------------------------------------------
def runtime_of(path: str | Path) -> str:
    return SUFFIX_RUNTIME.get(Path(path).suffix, "?")


def open_artifact(path: str | Path, runtime: str | None = None, threads: int | None = None,
                  names: list[str] | None = None, worker: ExecuTorchWorker | None = None) -> Session:
    """A Session on `path` in `runtime` (from the suffix when not given). ExecuTorch programs run
    in `worker` when one is given (one child process for many programs), else in their own."""
    path = Path(path)
    runtime = runtime or runtime_of(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such artifact")
    threads = threads or default_threads()
    if runtime == "onnxruntime":
        return OnnxSession(path, threads)
    if runtime == "litert":
        return LiteRTSession(path, threads, names)
    if runtime == "executorch":
        return ExecuTorchSession(path, threads, names, worker)
    raise ValueError(f"{path}: no host runtime for {runtime!r} (this machine runs {', '.join(HOST_RUNTIMES)})")


def run_artifact(path: str | Path, runs: list[list[np.ndarray]], runtime: str | None = None,
                 names: list[str] | None = None, worker: ExecuTorchWorker | None = None
                 ) -> tuple[list[list[np.ndarray]], dict]:
    """(outputs of every run, the I/O spec the runtime reports) of one artifact."""
    with open_artifact(path, runtime, names=names, worker=worker) as s:
        return s.run_many(runs), s.spec()
