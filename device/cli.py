"""`mcad bench [run] key=value ...`: search latency and running memory on a device, against budgets.

  mcad bench device=local run=runs/x threads=1,2 galleries=1000,10000,100000
  mcad bench device=R5CX123ABC runner=python            # a phone over adb (Python + runtime wheels)
  mcad bench device=R5CX123ABC runner=native et_runner=build/executor_runner tflite_runner=build/benchmark_model
  mcad bench device="qaihub:Samsung Galaxy S24"         # Qualcomm AI Hub profile jobs
  mcad bench quick=1                                    # CI gate: 1k gallery, few runs, no peers

Options (key=value; lists comma-separated):
  device=local|<adb-serial>|qaihub:<name>   run=runs/<name> (default: the newest run)
  threads=1,2  galleries=1000,10000,100000  runtimes=onnxruntime,litert,executorch
  quant=fp32,int8 (filter)  make_quant=fp32,int8 (variants the bench makes itself when no export)
  scorer=faiss|numpy  k=10  peers=full|tiny|none  mobile=1|0  image=1|0
  target=cpu|snapdragon|dimensity|all (default: the SoC family's export when there is one, else cpu)
  quick=1 (or --quick)  runs=N (min runs)  warmup=N  min_time=S  max_time=S  max_runs=N
  budgets=benchmarks/budgets.yaml  budget=<entry>  out=runs/<name>/bench  results=benchmarks/results|none
  name=<summary name>  cache=build/bench-cache  build_timeout=900 (s per bench-made artifact)
  adb:    adb=PATH  runner=auto|python|native  python=python3  remote_root=/data/local/tmp
          et_runner=PATH|device:PATH  tflite_runner=PATH|device:PATH  cpus=4-7  keep=1  timeout=S
  qaihub: options="--compute_unit cpu"  iterations=100
Exit status: 0 when every budget holds, 1 when a budget is broken or a job failed (the last line says which).
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from mcad.device.base import Timing

log = logging.getLogger("mcad.bench")
DEVICE_KEYS = {"adb", "runner", "python", "remote_root", "et_runner", "tflite_runner", "cpus", "timeout", "keep",
               "options", "iterations"}
BENCH_KEYS = {"device", "run", "threads", "galleries", "runtimes", "quant", "make_quant", "scorer", "k", "quick",
              "peers", "mobile", "image", "budgets", "budget", "out", "results", "name", "target", "cache", "runs",
              "warmup", "min_time", "max_time", "max_runs", "build_timeout"}
TRUE = {"1", "true", "yes", "on", "y"}


def _ints(key: str, v: str) -> list[int]:
    try:
        out = [int(float(x)) for x in str(v).replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"{key}={v!r}: expected comma-separated integers") from None
    if not out or any(x <= 0 for x in out):
        raise ValueError(f"{key}={v!r}: expected positive integers")
    return out


def _list(v: str) -> list[str]:
    return [x.strip() for x in str(v).split(",") if x.strip()]


def parse_args(argv: list[str]):
    from mcad.benchmarks.search import ALL_RUNTIMES, BenchOptions, command_line

    kv: dict[str, str] = {}
    for a in argv:
        if a in ("--quick", "-q"):
            kv["quick"] = "1"
        elif "=" in a:
            k, v = a.split("=", 1)
            k = k.strip().lstrip("-").replace("-", "_")
            if k not in BENCH_KEYS | DEVICE_KEYS:
                raise ValueError(f"unknown option {k!r} (known: {', '.join(sorted(BENCH_KEYS | DEVICE_KEYS))})")
            kv[k] = v
        elif a.startswith("-"):
            raise ValueError(f"unknown flag {a!r} (see `mcad bench --help`)")
        else:
            kv["run"] = a
    quick = kv.get("quick", "0").lower() in TRUE
    o = BenchOptions(command=command_line(argv), quick=quick)
    o.device = kv.get("device", "local")
    o.run = Path(kv["run"]) if kv.get("run") else None
    o.threads = _ints("threads", kv["threads"]) if "threads" in kv else ([1] if quick else [1, 2])
    o.galleries = _ints("galleries", kv["galleries"]) if "galleries" in kv else ([1000] if quick else [1000, 10000, 100000])
    if "runtimes" in kv:
        o.runtimes = _list(kv["runtimes"])
        bad = [r for r in o.runtimes if r not in ALL_RUNTIMES]
        if bad or not o.runtimes:
            raise ValueError(f"runtimes={kv['runtimes']!r}: expected some of {', '.join(ALL_RUNTIMES)}")
    o.quant = _list(kv["quant"]) if kv.get("quant") else None
    if kv.get("make_quant"):
        o.make_quant = _list(kv["make_quant"])
        if set(o.make_quant) - {"fp32", "int8"}:
            raise ValueError(f"make_quant={kv['make_quant']!r}: expected fp32 and/or int8")
    o.scorer = kv.get("scorer", "faiss")
    if o.scorer not in ("faiss", "numpy"):
        raise ValueError(f"scorer={o.scorer!r}: expected faiss or numpy")
    o.k = int(kv.get("k", 10))
    o.peers = kv.get("peers", "none" if quick else "full")
    if o.peers in ("0", "false", "no", "off"):
        o.peers = "none"
    if o.peers in ("1", "true", "yes", "on"):
        o.peers = "full"
    if o.peers not in ("full", "tiny", "none"):
        raise ValueError(f"peers={o.peers!r}: expected full, tiny or none")
    o.mobile = kv.get("mobile", "0" if quick else "1").lower() in TRUE
    o.image = kv.get("image", "0" if quick else "1").lower() in TRUE
    o.budgets = Path(kv["budgets"]) if kv.get("budgets") else None
    o.budget = kv.get("budget") or None
    o.out = Path(kv["out"]) if kv.get("out") else None
    res = kv.get("results", "none" if quick else "")
    from mcad.benchmarks.search import RESULTS_DIR

    o.results = None if res.lower() in ("none", "0", "no", "off") else (Path(res) if res else RESULTS_DIR)
    o.name = kv.get("name") or None
    o.target = kv.get("target") or None
    o.cache = Path(kv["cache"]) if kv.get("cache") else None
    base = Timing.quick() if quick else Timing()
    try:
        o.timing = Timing(warmup=int(kv.get("warmup", base.warmup)), min_runs=int(kv.get("runs", base.min_runs)),
                          max_runs=int(kv.get("max_runs", max(base.max_runs, int(kv.get("runs", 0) or 0)))),
                          min_time_s=float(kv.get("min_time", base.min_time_s)),
                          max_time_s=float(kv.get("max_time", base.max_time_s)))
    except ValueError:
        raise ValueError("runs/warmup/max_runs must be integers, min_time/max_time numbers") from None
    if kv.get("build_timeout"):
        from mcad.benchmarks import artifacts

        artifacts.BUILD_TIMEOUT_S = float(kv["build_timeout"])
    dev = {}
    for k in DEVICE_KEYS & set(kv):
        v = kv[k]
        if k == "timeout":
            dev["timeout_s"] = float(v)
        elif k == "keep":
            dev["keep"] = v.lower() in TRUE
        elif k == "iterations":
            dev["iterations"] = int(v)
        else:
            dev[k] = v
    o.device_options = dev
    return o


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
    from mcad.benchmarks.search import console_summary, run_bench
    from mcad.device.errors import DeviceError
    from mcad.models.checkpoint import CheckpointError

    try:
        opts = parse_args(argv)
        res, code = run_bench(opts)
    except (DeviceError, CheckpointError) as e:
        print(f"mcad bench: error: {e}", file=sys.stderr)
        return 1
    for line in console_summary(res):
        print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
