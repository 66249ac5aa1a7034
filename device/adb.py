"""`<adb-serial>`: a phone or board over adb. Pushes the artifact, inputs and a runner into a work
folder under /data/local/tmp, runs pinned with `taskset` and the thread count asked, collects
timings and peak memory (VmHWM), reads the SoC, and removes the folder afterwards.

Two runners: the Python runner (device/runner.py pushed as one file; needs python3 + numpy + the
runtime wheel on the device) and the native ones (ExecuTorch `executor_runner`, LiteRT
`benchmark_model`, built for the phone; device/README.md says how). `runner=auto` takes Python
where the device's Python has the runtime, else the native runner when one is configured.

Everything that reaches the device shell is quoted with shlex.quote; the serial travels as an argv
element of adb, never through a shell."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np

from mcad.device import native
from mcad.device.base import RUNNER_FILE, Device, Job, log, memory_summary, parse_runner_output
from mcad.device.errors import DeviceError, DeviceGone, one_line
from mcad.device.local import RUNTIME_MODULES, parse_cpus

SOC_PROPS = ("ro.soc.model", "ro.soc.manufacturer", "ro.board.platform", "ro.hardware", "ro.product.model",
             "ro.product.manufacturer", "ro.build.version.release")
PY_MODULES = ("numpy", "onnxruntime", "ai_edge_litert", "tflite_runtime", "executorch", "faiss", "tokenizers")
STATE_HELP = {
    "unauthorized": "unauthorized: accept the 'Allow USB debugging' prompt on the device, then retry",
    "offline": "offline: reconnect the cable or run `adb kill-server && adb start-server`",
    "no permissions": "no permissions: add a udev rule for the device (or run adb as root)",
    "recovery": "in recovery mode: boot it into Android",
    "bootloader": "in the bootloader: boot it into Android",
    "sideload": "in sideload mode: boot it into Android",
}


ADB_ERROR = re.compile(r"^(?:error|adb): (?:device (?:'[^']*' )?)?(?P<what>not found|unauthorized|offline|"
                       r"no devices/emulators found|no permissions)", re.M)


def resolve_adb(adb: str | None) -> str:
    cand = adb or os.environ.get("MCAD_ADB") or "adb"
    path = shutil.which(cand) if os.sep not in cand else (cand if os.access(cand, os.X_OK) else None)
    if not path:
        raise DeviceError(f"adb: {cand!r} not found (install it: `apt-get install -y adb`, or pass adb=/path/to/adb)")
    return path


def parse_devices(text: str) -> dict[str, str]:
    """`adb devices` output -> {serial: state}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("List of devices", "*", "adb server", "daemon")):
            continue
        parts = line.split("\t") if "\t" in line else line.split(None, 1)
        if len(parts) >= 2:
            out[parts[0].strip()] = parts[1].strip().split()[0] if parts[1].strip() else ""
    return out


def cpu_mask(cpus: list[int]) -> str:
    return format(sum(1 << c for c in cpus), "x")


class AdbDevice(Device):
    kind = "adb"

    def __init__(self, serial: str, adb: str | None = None, runner: str = "auto", python: str = "python3",
                 remote_root: str = "/data/local/tmp", et_runner: str | None = None,
                 tflite_runner: str | None = None, cpus=None, timeout_s: float = 900.0, keep: bool = False,
                 **_ignored):
        super().__init__(serial, timeout_s)
        if not serial or serial.startswith("-"):
            raise DeviceError(f"adb: {serial!r} is not a device serial")
        self.serial = serial
        self.adb_arg = adb
        if runner not in ("auto", "python", "native"):
            raise DeviceError(f"adb: runner={runner!r}: expected auto, python or native")
        self.runner = runner
        self.python = python
        self.remote_root = remote_root.rstrip("/") or "/data/local/tmp"
        self.et_runner = et_runner or os.environ.get("MCAD_ET_RUNNER")
        self.tflite_runner = tflite_runner or os.environ.get("MCAD_TFLITE_BENCHMARK")
        self.cpus = parse_cpus(cpus)
        self.keep = keep
        self.dir: str | None = None
        self._pushed: dict[str, str] = {}
        self._n = 0
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.py_modules: set[str] = set()
        self.online: list[int] = []
        self.has_taskset = False

    # -- adb plumbing ---------------------------------------------------------------------------
    def _adb(self, *args: str, timeout: float | None = None, serial: bool = True, what: str = "") -> subprocess.CompletedProcess:
        argv = [self.adb] + (["-s", self.serial] if serial else []) + [str(a) for a in args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout or self.timeout_s)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"adb: {self.serial}: {what or args[0]} timed out after {timeout or self.timeout_s:.0f} s") from None
        except OSError as e:
            raise DeviceError(f"adb: cannot run {self.adb}: {e.strerror}") from None
        if proc.returncode != 0:
            m = ADB_ERROR.search(proc.stderr or "")  # adb's own messages, not the remote command's
            if m and m.group("what") in ("not found", "no devices/emulators found"):
                raise DeviceGone(f"adb: device {self.serial!r} not found (disconnected?)")
            if m:
                raise DeviceGone(f"adb: device {self.serial!r} is {STATE_HELP.get(m.group('what'), m.group('what'))}")
        return proc

    def shell(self, cmd: str, timeout: float | None = None, check: bool = True, what: str = "") -> str:
        proc = self._adb("shell", cmd, timeout=timeout, what=what or "shell")
        if check and proc.returncode != 0:
            raise DeviceError(f"adb: {self.serial}: {what or 'shell command'} failed (exit {proc.returncode}): "
                              f"{one_line(proc.stderr or proc.stdout or '')}")
        return proc.stdout

    def push(self, local: str | Path, name: str | None = None) -> str:
        """Push once per local file; returns the remote path."""
        local = str(local)
        if local in self._pushed:
            return self._pushed[local]
        if not os.path.exists(local):
            raise DeviceError(f"adb: {local}: no such file to push")
        base = name or Path(local).name
        used = {Path(r).name for r in self._pushed.values()}
        i = 1
        while base in used:  # two local files with one name (text_encoder.onnx of two models)
            base = f"{i}_{name or Path(local).name}"
            i += 1
        remote = f"{self.dir}/{base}"
        proc = self._adb("push", local, remote, what=f"push {Path(local).name}")
        if proc.returncode != 0:
            raise DeviceError(f"adb: {self.serial}: push {local} failed: {one_line(proc.stderr or proc.stdout)}")
        self._pushed[local] = remote
        return remote

    def pull(self, remote: str, local: str | Path) -> Path:
        proc = self._adb("pull", remote, str(local), what=f"pull {Path(remote).name}")
        if proc.returncode != 0:
            raise DeviceError(f"adb: {self.serial}: pull {remote} failed: {one_line(proc.stderr or proc.stdout)}")
        return Path(local)

    # -- session --------------------------------------------------------------------------------
    def connect(self) -> dict:
        self.adb = resolve_adb(self.adb_arg)
        proc = self._adb("devices", serial=False, timeout=60, what="devices")
        states = parse_devices(proc.stdout)
        if self.serial not in states:
            listed = ", ".join(f"{s} ({st})" for s, st in states.items()) or "none"
            raise DeviceError(f"adb: device {self.serial!r} not found (attached: {listed})")
        state = states[self.serial]
        if state != "device":
            raise DeviceError(f"adb: device {self.serial!r} is {STATE_HELP.get(state, state)}")
        st = self._adb("get-state", timeout=60, what="get-state")
        if st.returncode != 0 or st.stdout.strip() != "device":
            raise DeviceError(f"adb: device {self.serial!r} is not ready ({one_line(st.stderr or st.stdout) or 'unknown state'})")
        props = {}
        out = self.shell("; ".join(f"echo {shlex.quote(p)}=$(getprop {shlex.quote(p)})" for p in SOC_PROPS),
                         timeout=60, what="getprop")
        for line in out.splitlines():
            k, _, v = line.partition("=")
            if k.strip() in SOC_PROPS:
                props[k.strip()] = v.strip()
        online = self.shell("cat /sys/devices/system/cpu/online", timeout=60, check=False, what="cpu list").strip()
        self.online = parse_cpus(online) or [0]
        self.has_taskset = bool(self.shell("command -v taskset || true", timeout=60, check=False).strip())
        self.dir = f"{self.remote_root}/mcad-bench-{uuid.uuid4().hex[:8]}"
        self.shell(f"mkdir -p {shlex.quote(self.dir)}", timeout=60, what="mkdir")
        self._tmp = tempfile.TemporaryDirectory(prefix="mcad-adb-")
        probe = (f"{shlex.quote(self.python)} -c "
                 + shlex.quote("import importlib.util as u, platform; "
                               f"print('MODS', platform.python_version(), *[m for m in {PY_MODULES!r} if u.find_spec(m)])"))
        py = self.shell(probe + " 2>/dev/null || true", timeout=120, check=False, what="python probe")
        line = next((ln for ln in py.splitlines() if ln.startswith("MODS ")), "")
        self.py_modules = set(line.split()[2:]) if line else set()
        py_version = line.split()[1] if line else None
        soc = props.get("ro.soc.model") or props.get("ro.board.platform") or props.get("ro.hardware") or None
        self.info = {"device": self.serial, "kind": self.kind, "soc": soc, "props": props, "cpus_online": self.online,
                     "taskset": self.has_taskset, "python": py_version, "python_modules": sorted(self.py_modules),
                     "et_runner": self.et_runner, "tflite_runner": self.tflite_runner, "work_dir": self.dir}
        log.info("adb %s: soc=%s python=%s modules=%s", self.serial, soc, py_version, sorted(self.py_modules))
        return self.info

    def close(self) -> None:
        if self.dir and not self.keep:
            try:
                self.shell(f"rm -rf {shlex.quote(self.dir)}", timeout=60, check=False, what="clean up")
            except DeviceError as e:
                log.warning("%s", e)
        self.dir = None
        self._pushed.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def budget_names(self) -> list[str]:
        p = self.info.get("props", {})
        return [v for v in (p.get("ro.soc.model"), p.get("ro.board.platform"), p.get("ro.hardware"),
                            p.get("ro.product.model"), self.serial) if v]

    def pick_cpus(self, threads: int) -> list[int]:
        # On big.LITTLE SoCs the highest-numbered cores are the big/prime ones.
        pool = self.cpus or self.online
        return sorted(pool)[-max(1, threads):]

    def _pin_prefix(self, threads: int) -> str:
        env = f"OMP_NUM_THREADS={int(threads)} "
        if self.has_taskset:
            return env + f"taskset {cpu_mask(self.pick_cpus(threads))} "
        return env

    # -- jobs -----------------------------------------------------------------------------------
    def cannot_run(self, runtime: str) -> str | None:
        try:
            self.runner_for(runtime)
        except DeviceError as e:
            return str(e)
        return None

    def runner_for(self, runtime: str) -> str:
        has_py = "numpy" in self.py_modules and any(m in self.py_modules for m in RUNTIME_MODULES[runtime])
        native_bin = {"executorch": self.et_runner, "litert": self.tflite_runner}.get(runtime)
        if self.runner == "python":
            if not has_py:
                raise DeviceError(f"adb: {self.serial}: no Python runner for {runtime} ({self.python} with numpy and "
                                  f"{' or '.join(RUNTIME_MODULES[runtime])} not found on the device)")
            return "python"
        if self.runner == "native" or not has_py:
            if not native_bin:
                what = {"executorch": "ExecuTorch executor_runner (et_runner=PATH)",
                        "litert": "LiteRT benchmark_model (tflite_runner=PATH)"}.get(runtime)
                if what is None:
                    raise DeviceError(f"adb: {self.serial}: no native runner for {runtime}, and the device's Python "
                                      f"cannot run it")
                raise DeviceError(f"adb: {self.serial}: no runner for {runtime}: configure the native {what} "
                                  f"(see device/README.md) or install Python with the runtime on the device")
            return "native"
        return "python"

    def _python_exec(self, spec: dict, job: Job, where: str) -> dict:
        self._n += 1
        n = self._n
        runner = self.push(RUNNER_FILE, "mcad_runner.py")
        local_spec = Path(self._tmp.name) / f"spec_{n}.json"
        local_spec.write_text(json.dumps(spec))
        rspec = self.push(local_spec, f"spec_{n}.json")
        rout = f"{self.dir}/result_{n}.json"
        cmd = (f"cd {shlex.quote(self.dir)} && {self._pin_prefix(job.threads)}"
               f"{shlex.quote(self.python)} {shlex.quote(runner)} --spec {shlex.quote(rspec)} --out {shlex.quote(rout)}")
        proc = self._adb("shell", cmd, what=where)
        text = proc.stdout + "\n" + proc.stderr
        if "MCAD_RESULT" not in text:  # some adb versions lose stdout of long runs: read the file
            try:
                local_out = self.pull(rout, Path(self._tmp.name) / f"result_{n}.json")
                text = "MCAD_RESULT " + local_out.read_text().strip()
            except DeviceError:
                pass
        return parse_runner_output(text, f"adb {self.serial}: {where}")

    def _names(self, job: Job) -> dict[str, str]:
        """Local path -> name inside the work folder (the runner resolves names next to its spec)."""
        names = {str(job.artifact.path): Path(self.push(job.artifact.path)).name}
        for p in (job.ids, job.tokenizer, job.gallery_file):
            if p is not None:
                names[str(p)] = Path(self.push(p)).name
        return names

    def run(self, job: Job) -> dict:
        if self.dir is None:
            self.connect()
        runner = self.runner_for(job.artifact.runtime)
        if runner == "native":
            return self._run_native(job)
        names = self._names(job)
        spec = job.spec(names)
        spec["cpus"] = self.pick_cpus(job.threads)
        res = self._python_exec(spec, job, job.key)
        key = job.bare_key()
        if key not in self._bare:
            bspec = job.bare_spec(names)
            bspec["cpus"] = spec["cpus"]
            self._bare[key] = self._python_exec(bspec, job, f"bare {job.artifact.runtime}")
        row = self.row(job, res, self._bare[key])
        row["soc"] = self.info.get("soc")
        return row

    # -- native runners -------------------------------------------------------------------------
    def _native_inputs(self, job: Job) -> tuple[list[str], dict[str, list]]:
        """Raw input files (what both native runners read) and their shapes."""
        a = job.artifact
        tmp = Path(self._tmp.name)
        files, shapes = [], {}
        if job.mode == "image":
            s = int(job.image_size or 224)
            x = np.random.default_rng(0).standard_normal((1, 3, s, s), dtype=np.float32)
            arrays = [("pixels", x)]
        else:
            ids = np.load(job.ids)[:1] if job.ids is not None else None
            if ids is None:
                raise DeviceError(f"adb: {job.key}: native runners need token ids (golden ids)")
            dt = a.inputs[0].dtype if a.inputs else ("int32" if a.runtime == "litert" else "int64")
            arrays = [(a.inputs[0].name if a.inputs else "ids", ids.astype(dt))]
            if a.role == "search" and not a.notes.get("gallery_bound"):  # a bound program holds its own
                columns = a.gallery_layout == "columns"
                d = int(job.embed_dim or (a.input_shape(1) or [0, 64])[0 if columns else -1])
                g = np.random.default_rng(job.seed).standard_normal((int(job.gallery), d), dtype=np.float32)
                g /= np.linalg.norm(g, axis=1, keepdims=True)
                arrays.append((a.inputs[1].name if len(a.inputs) > 1 else "gallery", g.T.copy() if columns else g))
        for name, arr in arrays:
            f = tmp / f"{a.path.stem}_{name}_{arr.shape[0]}.bin"
            np.ascontiguousarray(arr).tofile(f)
            files.append(self.push(f))
            shapes[name] = list(arr.shape)
        return files, shapes

    def _native_binary(self, runtime: str) -> str:
        path = {"executorch": self.et_runner, "litert": self.tflite_runner}[runtime]
        if path.startswith("device:"):
            return path[len("device:"):]
        if not os.path.exists(path):
            raise DeviceError(f"adb: native runner {path}: no such file (see device/README.md to build it)")
        remote = self.push(path)
        self.shell(f"chmod 755 {shlex.quote(remote)}", timeout=60, what="chmod runner")
        return remote

    def _run_native(self, job: Job) -> dict:
        a = job.artifact
        binary = self._native_binary(a.runtime)
        model = self.push(a.path)
        memwrap = self.push(self._memwrap(), "mcad_memwrap.sh")
        files, shapes = self._native_inputs(job)
        runs = max(job.timing.min_runs, 20)
        if a.runtime == "executorch":
            cmd = native.executor_runner_cmd(binary, model, runs, job.threads, files)
        else:
            cmd = native.benchmark_model_cmd(binary, model, runs, job.timing.warmup, job.threads,
                                             dict(zip(shapes, files)), shapes)
        self._n += 1
        out, hwm = f"{self.dir}/native_{self._n}.txt", f"{self.dir}/native_{self._n}.hwm"
        self.shell(f"cd {shlex.quote(self.dir)} && {self._pin_prefix(job.threads)}sh {shlex.quote(memwrap)} "
                   f"{shlex.quote(out)} {shlex.quote(hwm)} {native.shell_join(cmd)}", what=job.key, check=False)
        text = self.shell(f"cat {shlex.quote(out)}", timeout=120, check=False, what="read runner output")
        hwm_text = self.shell(f"cat {shlex.quote(hwm)}", timeout=60, check=False, what="read VmHWM")
        tool = Path(binary).name
        native.check_exit(text, f"adb {self.serial}: {tool}")
        try:
            parsed = (native.parse_executor_runner(text) if a.runtime == "executorch"
                      else native.parse_benchmark_model(text))
        except ValueError as e:
            raise DeviceError(f"adb {self.serial}: {e}") from None
        peak = native.parse_vmhwm(hwm_text)
        if peak is None and parsed.get("peak_mb"):
            peak = parsed["peak_mb"]
        stage = "search" if a.role == "search" else "encode"
        res = {"runner": f"native:{tool}", "stages": {stage: parsed["encode"]}, "runs": parsed["encode"].get("n"),
               "cpus": self.pick_cpus(job.threads),
               "native": {k: v for k, v in parsed.items() if k not in ("iterations_ms", "encode")},
               "note": "native runner: encoder only (score+top-k not run natively)" if stage == "encode" else None}
        row = self.row(job, res, None)
        row["memory"] = memory_summary("native", {"peak_mb": peak, "source": "VmHWM of the runner (polled)"}, None)
        row["soc"] = self.info.get("soc")
        return row

    def _memwrap(self) -> Path:
        p = Path(self._tmp.name) / "mcad_memwrap.sh"
        if not p.exists():
            p.write_text(native.MEMWRAP_SH)
        return p
