"""Budgets (benchmarks/budgets.yaml): per device, per subject, per gallery size: search latency p50
and p90 (ms) and running memory (MB). A broken budget is one line naming it."""
from __future__ import annotations

from pathlib import Path

import yaml

BUDGETS_FILE = Path(__file__).with_name("budgets.yaml")
METRICS = ("p50_ms", "p90_ms", "memory_mb", "p50_x", "p90_x")
# p50_x / p90_x: search latency as a multiple of the calibration kernel timed right before the job
# (mcad.benchmarks.calibration): a limit that holds on any machine of the class, busy or not.
RELATIVE = {"p50_x": "p50", "p90_x": "p90"}
RUNTIMES = ("onnxruntime", "litert", "executorch", "qnn")
PROGRAMS = ("search", "text_encoder")


def load_budgets(path: str | Path | None = None) -> dict:
    """The budgets file, checked whole before any bench runs: every mapping where one belongs,
    every gallery size an integer, every limit a positive number (one line naming the key)."""
    path = Path(path) if path else BUDGETS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no budgets file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    data = {} if data is None else data
    _mapping(data, path, "the top level", "a mapping with 'devices:'")
    devices = data.get("devices")
    if not isinstance(devices, dict):
        raise ValueError(f"{path}: expected a top-level 'devices:' mapping")
    for name, entry in devices.items():
        _check_device(path, name, {} if entry is None else entry)
    data["_path"] = str(path)
    return data


def _mapping(value, path: Path, key: str, what: str) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{path}: {key}: expected {what}, got {type(value).__name__} {value!r:.40}")


def _check_device(path: Path, name: str, entry) -> None:
    key = f"devices.{name}"
    _mapping(entry, path, key, "a mapping with 'match:' and 'budgets:'")
    match = entry.get("match", [])
    if not isinstance(match, list) or not all(isinstance(m, (str, int)) for m in match):
        raise ValueError(f"{path}: {key}.match: expected a list of device names, got {match!r:.40}")
    subj = entry.get("budgets")
    if not isinstance(subj, dict):
        raise ValueError(f"{path}: {key}: expected a 'budgets:' mapping of subject -> gallery -> limits")
    for s, per in subj.items():
        per = {} if per is None else per
        _mapping(per, path, f"{key}.budgets.{s}", "a mapping of gallery size -> limits")
        for g, lim in per.items():
            try:
                int(g)
            except (TypeError, ValueError):
                raise ValueError(f"{path}: {key}.budgets.{s}: gallery size {g!r} is not an integer") from None
            _check_limits(path, f"{key}.budgets.{s}.{g}", {} if lim is None else lim)


def _check_limits(path: Path, key: str, lim, nest: tuple = ("runtime", "program")) -> None:
    """Limits of one gallery size. A runtime's name, and within it (or directly) a program's name
    (`search`: the shipped search program; `text_encoder`: encoder + the runner's scan) hold limits
    for those jobs only, overriding the shared ones: runtimes and programs differ several-fold."""
    _mapping(lim, path, key, f"a mapping of {', '.join(METRICS)}")
    allowed = {"runtime": RUNTIMES, "program": PROGRAMS}
    for kind, names in allowed.items():
        for name in [k for k in lim if k in names]:
            if kind not in nest:
                raise ValueError(f"{path}: {key}.{name}: {kind} limits do not nest here")
            inner = tuple(n for n in nest[nest.index(kind) + 1:])
            _check_limits(path, f"{key}.{name}", {} if lim[name] is None else lim[name], inner)
    bad = set(lim) - set(METRICS) - set(RUNTIMES) - set(PROGRAMS)
    if bad:
        raise ValueError(f"{path}: {key}: unknown metric(s) {sorted(bad)} (known: {', '.join(METRICS)}; "
                         f"or a runtime: {', '.join(RUNTIMES)}; or a program: {', '.join(PROGRAMS)})")
    for metric, value in ((m, v) for m, v in lim.items() if m in METRICS):  # found now, not after the bench ran
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{path}: {key}.{metric}: {value!r} is not a positive number")


def limits_for(lim: dict, runtime: str | None, program: str | None) -> dict:
    """The limits of one job: shared < the program's < the runtime's < the runtime's program's."""
    def own(d):
        return {m: v for m, v in (d or {}).items() if m in METRICS}

    rt = lim.get(runtime) or {}
    return {**own(lim), **own(lim.get(program)), **own(rt), **own(rt.get(program))}


def match_device(budgets: dict, names: list[str], override: str | None = None) -> tuple[str | None, dict | None]:
    """The budgets entry for a device: `override` by name, else the first entry whose name or `match`
    list contains one of `names` (case-insensitive)."""
    devices = budgets["devices"]
    if override:
        if override not in devices:
            raise KeyError(f"budget={override!r}: not in {budgets.get('_path')} (known: {', '.join(devices)})")
        return override, devices[override]
    low = [n.lower() for n in names if n]
    for key, entry in devices.items():
        keys = [key.lower()] + [str(m).lower() for m in (entry or {}).get("match", [])]
        if any(n in keys for n in low):
            return key, entry
    return None, None


def job_limits(entry: dict | None, job: dict) -> dict:
    """The limits that hold for one bench row (or job description): {} for peers, encode jobs and
    sizes without a budget."""
    per = ((entry or {}).get("budgets") or {}).get(job.get("subject"))
    if not per or job.get("mode") != "search":
        return {}
    lim = per.get(job.get("gallery")) or per.get(str(job.get("gallery")))
    return limits_for(lim, job.get("runtime"), job.get("artifact")) if lim else {}


def check(rows: list[dict], entry: dict, budget_name: str) -> list[dict]:
    """One check per (row, metric) that a budget covers; rows with errors are broken outright."""
    out = []
    for r in rows:
        lim = job_limits(entry, r)
        if not lim:
            continue
        from mcad.benchmarks.subjects import quant_family

        subject = r["subject"] + (f":{r['artifact']}" if r.get("artifact") else "")
        where = (f"{budget_name}/{subject}/N={r['gallery']}/{r['runtime']}"
                 f"/{quant_family(r.get('quantization', ''))}/t{r['threads']}")
        if r.get("error"):
            out.append({"budget": where, "metric": "run", "measured": None, "limit": None, "ok": False,
                        "line": f"BROKEN {where}: job failed ({r['error']})"})
            continue
        search = (r.get("stages") or {}).get("search") or {}
        measured = {"p50_ms": search.get("p50"), "p90_ms": search.get("p90"),
                    "memory_mb": (r.get("memory") or {}).get("headline_mb")}
        ref = r.get("reference_ms")
        for metric, stat in RELATIVE.items():
            measured[metric] = search[stat] / ref if ref and search.get(stat) is not None else None
        for metric in METRICS:
            if metric not in lim:
                continue
            val, limit = measured[metric], float(lim[metric])
            if val is None:
                out.append({"budget": where, "metric": metric, "measured": None, "limit": limit, "ok": True,
                            "line": f"n/a    {where} {metric}: not measured by this runner"})
                continue
            ok = float(val) <= limit
            tries = len(r.get("attempts") or []) if metric not in ("memory_mb",) else 0
            note = f" (fastest of {tries} attempts)" if tries > 1 else ""
            out.append({"budget": where, "metric": metric, "measured": round(float(val), 3), "limit": limit, "ok": ok,
                        "line": f"{'ok    ' if ok else 'BROKEN'} {where} {_describe(metric, val, limit, ok, ref)}{note}"})
    return out


def _describe(metric: str, val: float, limit: float, ok: bool, ref: float | None) -> str:
    """`search latency p50: 0.91 ms <= budget 2 ms`, or for a relative limit
    `search latency p50: 2.31x the calibration kernel (0.87 ms) > budget 1.6x`."""
    name = {"p50_ms": "search latency p50", "p90_ms": "search latency p90", "memory_mb": "running memory",
            "p50_x": "search latency p50", "p90_x": "search latency p90"}[metric]
    rel = "<=" if ok else ">"
    if metric in RELATIVE:
        return (f"{name}: {val:.2f}x the calibration kernel ({ref:.3f} ms) {rel} budget {limit:g}x")
    unit = "MB" if metric == "memory_mb" else "ms"
    return f"{name}: {val:.2f} {unit} {rel} budget {limit:g} {unit}"
