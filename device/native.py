"""Native runners on a phone: ExecuTorch `executor_runner` (.pte) and LiteRT `benchmark_model`
(.tflite). Command lines and parsers for their documented output (see device/README.md).

executor_runner (examples/portable/executor_runner/executor_runner.cpp) logs through ET_LOG:
    I 00:00:00.012345 executorch:executor_runner.cpp:312] Model loaded in 4.2 ms.
    I 00:00:00.013000 executorch:executor_runner.cpp:520] Iteration 1 of 50: 1.234000 ms
    I 00:00:00.090000 executorch:executor_runner.cpp:532] Model executed successfully 50 time(s) in 61.7 ms.
(older builds print only the last line; some embedded ports print "I [executorch:...] ...").

benchmark_model (tensorflow/lite/tools/benchmark/benchmark_model.cc) logs:
    count=50 first=266601 curr=266931 min=265837 max=268116 avg=266473 std=419
    Inference timings in us: Init: 20283, First inference: 339304, Warmup (avg): 302814, Inference (avg): 266473
    Memory footprint delta from the start of the tool (MB): init=5.2 overall=12.9
    Overall peak memory footprint (MB) via periodic monitoring: 18.4
(newer builds prefix lines with "INFO: "; the first `count=` line is the warm-up, the second the runs).
"""
from __future__ import annotations

import re
import shlex

from mcad.device.errors import DeviceError

_ET_ITER = re.compile(r"Iteration\s+(\d+)\s+of\s+(\d+):\s*([0-9.eE+-]+)\s*ms")
_ET_TOTAL = re.compile(r"Model executed successfully\s+(\d+)\s+time\(s\)\s+in\s+([0-9.eE+-]+)\s*ms")
_ET_LOAD = re.compile(r"Model loaded in\s+([0-9.eE+-]+)\s*ms")
_ET_ERROR = re.compile(r"^E\s+(?:\d\d:\d\d:\d\d\.\d+\s+)?\[?executorch:[^\]]*\]\s*(.*)$", re.M)
_TFL_STAT = re.compile(r"count=(\d+)((?:\s+\w+=[-0-9.eE+]+)*)")
_TFL_TIMINGS = re.compile(r"Inference timings in us:\s*(.*)")
_TFL_FOOT = re.compile(r"Memory footprint delta from the start of the tool \(MB\):\s*init=([-0-9.eE+]+)\s+overall=([-0-9.eE+]+)")
_TFL_PEAK = re.compile(r"Overall peak memory footprint \(MB\) via periodic monitoring:\s*([-0-9.eE+]+)")
_VMHWM = re.compile(r"VmHWM:\s*(\d+)\s*kB")


def _pcts(values: list[float]) -> dict:
    from mcad.device.runner import summarize_ms

    return summarize_ms(values)


def parse_executor_runner(text: str) -> dict:
    """-> {'iterations_ms': [...], 'n', 'total_ms', 'load_ms', 'encode': percentile dict}."""
    iters = [float(m.group(3)) for m in _ET_ITER.finditer(text)]
    total = _ET_TOTAL.search(text)
    load = _ET_LOAD.search(text)
    if total is None and not iters:
        err = _ET_ERROR.search(text)
        raise ValueError("executor_runner: no timing in its output"
                         + (f" (error: {err.group(1).strip()})" if err else ""))
    out: dict = {"iterations_ms": iters, "load_ms": float(load.group(1)) if load else None}
    if total is not None:
        out["n"], out["total_ms"] = int(total.group(1)), float(total.group(2))
    else:
        out["n"], out["total_ms"] = len(iters), sum(iters)
    if iters:
        out["encode"] = _pcts(iters)
    else:  # only the total: the mean is all there is
        mean = out["total_ms"] / max(1, out["n"])
        out["encode"] = {"n": out["n"], "mean": round(mean, 4), "p50": None, "p90": None, "p99": None,
                         "note": "executor_runner printed only the total; mean per run"}
    return out


def _stat(fields: str, count: int) -> dict:
    d: dict = {"count": count}
    for kv in fields.split():
        k, _, v = kv.partition("=")
        d[k] = float(v)
    return d


def parse_benchmark_model(text: str) -> dict:
    """-> {'warmup': stat, 'runs': stat, 'init_us', 'first_us', 'warmup_avg_us', 'avg_us',
    'mem_init_mb', 'mem_overall_mb', 'peak_mb', 'encode': dict in ms}. Stats in microseconds."""
    stats = [_stat(m.group(2), int(m.group(1))) for m in _TFL_STAT.finditer(text)]
    t = _TFL_TIMINGS.search(text)
    if t is None and not stats:
        err = re.search(r"^(?:ERROR:\s*)(.*)$", text, re.M)
        raise ValueError("benchmark_model: no timing in its output" + (f" (error: {err.group(1).strip()})" if err else ""))
    out: dict = {"warmup": stats[0] if len(stats) > 1 else None, "runs": stats[-1] if stats else None}
    if t is not None:
        parts = dict((k.strip(), float(v)) for k, v in re.findall(r"([A-Za-z ()]+):\s*([-0-9.eE+]+)", t.group(1)))
        out["init_us"] = parts.get("Init")
        out["first_us"] = parts.get("First inference")
        out["warmup_avg_us"] = parts.get("Warmup (avg)")
        out["avg_us"] = parts.get("Inference (avg)")
    foot = _TFL_FOOT.search(text)
    if foot:
        out["mem_init_mb"], out["mem_overall_mb"] = float(foot.group(1)), float(foot.group(2))
    peak = _TFL_PEAK.search(text)
    out["peak_mb"] = float(peak.group(1)) if peak else None
    runs = out["runs"] or {}
    avg_us = out.get("avg_us") or runs.get("avg")
    enc = {"n": int(runs.get("count", 0)), "mean": round(avg_us / 1e3, 4) if avg_us else None,
           "min": round(runs["min"] / 1e3, 4) if "min" in runs else None,
           "max": round(runs["max"] / 1e3, 4) if "max" in runs else None,
           "std": round(runs["std"] / 1e3, 4) if "std" in runs else None,
           "p50": None, "p90": None, "p99": None,
           "note": "benchmark_model reports mean/min/max/std, not percentiles"}
    for name, key in (("p50", "median"), ("p50", "p50"), ("p90", "p90"), ("p99", "p99")):
        if key in runs:  # builds that print percentiles
            enc[name] = round(runs[key] / 1e3, 4)
    out["encode"] = enc
    return out


def parse_vmhwm(text: str) -> float | None:
    """Largest `VmHWM: N kB` in the text, in MB."""
    vals = [int(m.group(1)) for m in _VMHWM.finditer(text or "")]
    return round(max(vals) / 1024.0, 2) if vals else None


# Watches a child's VmHWM while it runs (the high-water mark only grows, so the last reading is the
# peak as of the child's last poll). Pushed as a file, run as `sh memwrap.sh OUT HWM CMD...`.
MEMWRAP_SH = r"""out="$1"; hwm="$2"; shift 2
"$@" >"$out" 2>&1 &
pid=$!
: >"$hwm"
while kill -0 "$pid" 2>/dev/null; do
  v=$(grep VmHWM "/proc/$pid/status" 2>/dev/null)
  [ -n "$v" ] && echo "$v" >"$hwm"
  sleep 0.02
done
wait "$pid"
echo "exit=$?" >>"$out"
"""


def executor_runner_cmd(binary: str, model: str, runs: int, threads: int, inputs: list[str] | None = None,
                        extra: list[str] | None = None) -> list[str]:
    cmd = [binary, f"--model_path={model}", f"--num_executions={int(runs)}", f"--cpu_threads={int(threads)}"]
    if inputs:
        cmd.append("--inputs=" + ",".join(inputs))
    return cmd + list(extra or [])


def benchmark_model_cmd(binary: str, model: str, runs: int, warmup: int, threads: int,
                        input_files: dict[str, str] | None = None, input_shapes: dict[str, list] | None = None,
                        extra: list[str] | None = None) -> list[str]:
    cmd = [binary, f"--graph={model}", f"--num_threads={int(threads)}", f"--num_runs={int(runs)}",
           f"--warmup_runs={int(warmup)}", "--report_peak_memory_footprint=true"]
    if input_files:
        names = list(input_files)
        cmd.append("--input_layer=" + ",".join(names))
        if input_shapes:
            cmd.append("--input_layer_shape=" + ":".join(",".join(str(int(d)) for d in input_shapes[n]) for n in names))
        cmd.append("--input_layer_value_files=" + ",".join(f"{n.replace(':', '::')}:{p}" for n, p in input_files.items()))
    return cmd + list(extra or [])


def shell_join(cmd: list[str]) -> str:
    return " ".join(shlex.quote(str(c)) for c in cmd)


def check_exit(text: str, what: str) -> None:
    m = re.search(r"^exit=(\d+)\s*$", text or "", re.M)
    if m and m.group(1) != "0":
        tail = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("exit=")][-1:]
        raise DeviceError(f"{what} exited with {m.group(1)}" + (f": {tail[0][:300]}" if tail else ""))
