"""`mcad bench [run] key=value ...`: search latency and running memory on a device, against budgets.
(The command lives with the benchmarks: it drives mcad.device and mcad.export, never the reverse.)

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
  gallery=fp32,fp16,int8,pq4 (the encoder + scan path's gallery: faiss flat, SQfp16, SQ8 per-dimension, or 4-bit PQ
          fast-scan codes with the best rows re-ranked exactly from the fp32 file; default fp32)
  rerank=r (compressed galleries: re-rank the k*r best from the fp32 rows on disk; 0 = off)
  confirm=2 (a job that breaks a latency budget runs again up to this many times and keeps its fastest
            attempt: noise only adds time, a regression breaks every attempt; 0 = judge the first run)
  target=cpu|snapdragon|dimensity|<target>-bound|all (default: the SoC family's export when there is one, else cpu)
  quick=1 (or --quick)  runs=N (min runs)  warmup=N  min_time=S  max_time=S  max_runs=N
  budgets=benchmarks/budgets.yaml  budget=<entry>  out=runs/<name>/bench  results=benchmarks/results|none
  name=<summary name>  cache=build/bench-cache  build_timeout=900 (s per bench-made artifact)
  allow_failed_parity=1 (bench an export whose parity failed: refused otherwise; every row of a failed
            artifact and bench.md say PARITY FAILED; budget=gate refuses it whatever this says)
  adb:    adb=PATH  runner=auto|python|native  python=python3  remote_root=/data/local/tmp
          et_runner=PATH|device:PATH  tflite_runner=PATH|device:PATH  cpus=4-7  keep=1  timeout=S
  qaihub: options="--compute_unit cpu"  iterations=100
Exit status: 0 when every budget holds, 1 when a budget is broken or a job failed (the last line says which).
"""
from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from mcad.benchmarks.engine import ALL_RUNTIMES, RESULTS_DIR, BenchOptions, command_line, run_bench
from mcad.benchmarks.report import console_summary
from mcad.device.base import Timing
from mcad.device.errors import DeviceError
from mcad.models.checkpoint import CheckpointError

log = logging.getLogger("mcad.bench")
# key -> default. None: derived (from quick=, the run, the device); BENCH_TYPES then gives the type.
BENCH_OPTIONS = {"device": "local", "run": None, "threads": None, "galleries": None, "runtimes": None, "quant": None,
                 "make_quant": None, "scorer": "faiss", "k": 10, "quick": False, "peers": None, "mobile": None,
                 "image": None, "budgets": None, "budget": None, "out": None, "results": None, "name": None,
                 "target": None, "cache": None, "runs": None, "warmup": None, "min_time": None, "max_time": None,
                 "max_runs": None, "build_timeout": None, "gallery": None, "rerank": 0, "confirm": 2,
                 "allow_failed_parity": False}
DEVICE_OPTIONS = {k: None for k in ("adb", "runner", "python", "remote_root", "et_runner", "tflite_runner", "cpus",
                                    "timeout", "keep", "options", "iterations")}
BENCH_TYPES = {"threads": list[int], "galleries": list[int], "runtimes": list[str], "quant": list[str], "gallery": list[str],
               "make_quant": list[str], "mobile": bool, "image": bool, "runs": int, "warmup": int, "min_time": float,
               "max_time": float, "max_runs": int, "build_timeout": float, "timeout": float, "keep": bool,
               "iterations": int}
BENCH_TYPES.update({k: str for k, v in {**BENCH_OPTIONS, **DEVICE_OPTIONS}.items()  # the other derived keys:
                    if v is None and k not in BENCH_TYPES})                        # text, paths
DEVICE_KEYS, BENCH_KEYS = set(DEVICE_OPTIONS), set(BENCH_OPTIONS)
TRUE = {"1", "true", "yes", "on", "y"}


def _positive(key: str, v: list[int]) -> list[int]:
    if not v or any(x <= 0 for x in v):
        raise ValueError(f"{key}={','.join(map(str, v))}: expected positive integers")
    return v


def _normalize(argv: list[str]) -> list[str]:
    """`--quick`/`-q` -> quick=1; `--min-time=5` / `min-time=5` -> min_time=5 (the spellings bench took)."""
    out = []
    for a in argv:
        key, sep, value = a.partition("=")
        if a in ("--quick", "-q"):
            out.append("quick=1")
        elif sep and re.fullmatch(r"-*[A-Za-z_][\w.-]*", key):
            out.append(key.lstrip("-").replace("-", "_") + "=" + value)
        else:
            out.append(a)
    return out


def parse_args(argv: list[str]):
    from mcad.config import parse_overrides

    p = parse_overrides(_normalize(argv), {**BENCH_OPTIONS, **DEVICE_OPTIONS}, positional=1, types=BENCH_TYPES)
    kv = p.config
    if p.positional:  # `mcad bench runs/<name>`
        kv["run"] = p.positional[0]
    quick = kv["quick"]

    def pick(key: str, full, fast):
        """the value given, else the default of a full or a quick bench"""
        return kv[key] if kv[key] is not None else (fast if quick else full)

    o = BenchOptions(command=command_line(argv), quick=quick)
    o.device = kv["device"]
    o.run = Path(kv["run"]) if kv["run"] else None
    o.threads = _positive("threads", pick("threads", [1, 2], [1]))
    o.galleries = _positive("galleries", pick("galleries", [1000, 10000, 100000], [1000]))
    if kv["runtimes"] is not None:
        o.runtimes = kv["runtimes"]
        bad = [r for r in o.runtimes if r not in ALL_RUNTIMES]
        if bad or not o.runtimes:
            raise ValueError(f"runtimes={','.join(o.runtimes)}: expected some of {', '.join(ALL_RUNTIMES)}")
    o.quant = kv["quant"] or None
    if kv["make_quant"]:
        o.make_quant = kv["make_quant"]
        if set(o.make_quant) - {"fp32", "int8"}:
            raise ValueError(f"make_quant={','.join(o.make_quant)}: expected fp32 and/or int8")
    from mcad.device.runner import GALLERY_DTYPES

    o.gallery_dtypes = kv["gallery"] or ["fp32"]
    if set(o.gallery_dtypes) - set(GALLERY_DTYPES) or not o.gallery_dtypes:
        raise ValueError(f"gallery={','.join(o.gallery_dtypes)}: expected some of {', '.join(GALLERY_DTYPES)}")
    o.rerank = int(kv["rerank"] or 0)
    if o.rerank < 0:
        raise ValueError(f"rerank={o.rerank}: expected 0 (off) or a shortlist factor r >= 1 (k * r re-ranked)")
    o.confirm = int(kv["confirm"])
    if o.confirm < 0:
        raise ValueError(f"confirm={o.confirm}: expected 0 (judge the first run) or how many times to re-measure")
    o.scorer = kv["scorer"]
    if o.scorer not in ("faiss", "numpy"):
        raise ValueError(f"scorer={o.scorer!r}: expected faiss or numpy")
    o.k = kv["k"]
    o.peers = pick("peers", "full", "none")
    if o.peers in ("0", "false", "no", "off"):
        o.peers = "none"
    if o.peers in ("1", "true", "yes", "on"):
        o.peers = "full"
    if o.peers not in ("full", "tiny", "none"):
        raise ValueError(f"peers={o.peers!r}: expected full, tiny or none")
    o.mobile = pick("mobile", True, False)
    o.image = pick("image", True, False)
    o.budgets = Path(kv["budgets"]) if kv["budgets"] else None
    o.budget = kv["budget"] or None
    o.out = Path(kv["out"]) if kv["out"] else None
    res = pick("results", "", "none")
    o.results = None if res.lower() in ("none", "0", "no", "off") else (Path(res) if res else RESULTS_DIR)
    o.name = kv["name"] or None
    o.allow_failed_parity = bool(kv["allow_failed_parity"])
    o.target = kv["target"] or None
    o.cache = Path(kv["cache"]) if kv["cache"] else None
    base = Timing.quick() if quick else Timing()
    runs = kv["runs"]
    o.timing = Timing(warmup=base.warmup if kv["warmup"] is None else kv["warmup"],
                      min_runs=base.min_runs if runs is None else runs,
                      max_runs=max(base.max_runs, runs or 0) if kv["max_runs"] is None else kv["max_runs"],
                      min_time_s=base.min_time_s if kv["min_time"] is None else kv["min_time"],
                      max_time_s=base.max_time_s if kv["max_time"] is None else kv["max_time"])
    if kv["build_timeout"]:
        from mcad.benchmarks import artifacts

        artifacts.BUILD_TIMEOUT_S = float(kv["build_timeout"])
    dev = {}
    for k in DEVICE_KEYS:
        if kv[k] is not None:
            dev["timeout_s" if k == "timeout" else k] = kv[k]
    o.device_options = dev
    return o


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(__doc__)
        return 0
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
