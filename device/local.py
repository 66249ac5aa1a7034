"""`local`: this machine. Every job runs in a fresh subprocess of the Python runner, pinned to
`threads` CPUs, next to a bare process that imported the same runtime (the memory baseline)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from mcad.device.base import Device, Job, log, parse_runner_output
from mcad.device.errors import DeviceError
from mcad.io import machine

# what the runner imports for each runtime (device/runner.py import_runtime)
RUNTIME_MODULES = {"onnxruntime": ("onnxruntime",), "litert": ("ai_edge_litert", "tflite_runtime"),
                   "executorch": ("executorch",)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_cpus(text) -> list[int] | None:
    """'0-3,6' or [0, 1] -> sorted CPU list."""
    if text in (None, "", "auto"):
        return None
    if isinstance(text, (list, tuple)):
        return sorted(int(c) for c in text)
    out: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    return sorted(out)


class LocalDevice(Device):
    kind = "local"

    def __init__(self, cpus=None, timeout_s: float = 900.0, python: str | None = None, **_ignored):
        super().__init__("local", timeout_s)
        self.cpus = parse_cpus(cpus)
        self.python = python or sys.executable
        self._tmp = None

    def connect(self) -> dict:
        avail = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        self.available = avail
        self._tmp = tempfile.TemporaryDirectory(prefix="mcad-bench-")
        self.info = {"device": "local", "kind": self.kind, "machine": machine(), "cpu": cpu_model(),
                     "cpus_available": avail, "python": platform.python_version(), "soc": None}
        return self.info

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def budget_names(self) -> list[str]:
        return ["local"]

    def cannot_run(self, runtime: str) -> str | None:
        import importlib.util

        if self.python != sys.executable:  # another interpreter: its jobs say what it lacks
            return None
        if any(importlib.util.find_spec(m) is not None for m in RUNTIME_MODULES.get(runtime, ())):
            return None
        return f"local: {self.python} has no {' or '.join(RUNTIME_MODULES.get(runtime, (runtime,)))} for {runtime}"

    def pick_cpus(self, threads: int) -> list[int]:
        pool = self.cpus or self.available
        if threads > len(pool):
            log.warning("local: %d threads asked, %d CPUs available (%s); pinning to all", threads, len(pool), pool)
        return pool[:max(1, threads)]

    def _exec(self, spec: dict, where: str, threads: int) -> dict:
        if self._tmp is None:
            self.connect()
        # the runner resolves relative paths against its spec's folder (what a pushed bundle on a
        # phone needs); here the files stay where they are, so hand it absolute paths
        for key in ("model", "ids", "tokenizer"):
            if isinstance(spec.get(key), str) and not os.path.isabs(spec[key]):
                spec[key] = os.path.abspath(spec[key])
        fd, path = tempfile.mkstemp(suffix=".json", dir=self._tmp.name)
        with os.fdopen(fd, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
        try:
            proc = subprocess.run([self.python, "-m", "mcad.device.runner", "--spec", path],
                                  capture_output=True, text=True, timeout=self.timeout_s, env=env)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"local: {where} timed out after {self.timeout_s:.0f} s") from None
        except OSError as e:
            raise DeviceError(f"local: cannot start {self.python}: {e.strerror}") from None
        return parse_runner_output(proc.stdout + ("\n" + proc.stderr if "MCAD_RESULT" not in proc.stdout else ""),
                                   f"local: {where}")

    def bare(self, job: Job) -> dict:
        key = job.bare_key()
        if key not in self._bare:
            spec = job.bare_spec()
            spec["cpus"] = self.pick_cpus(job.threads)
            self._bare[key] = self._exec(spec, f"bare {job.artifact.runtime}", job.threads)
        return self._bare[key]

    def run(self, job: Job) -> dict:
        spec = job.spec()
        spec["cpus"] = self.pick_cpus(job.threads)
        res = self._exec(spec, job.key, job.threads)
        return self.row(job, res, self.bare(job))
