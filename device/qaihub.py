"""`qaihub:<device name>`: profile compiled assets (.tflite, .onnx) on Qualcomm AI Hub's hosted
phones and read latency and peak memory from the profile.

Needs an API token in ~/.qai_hub/client.ini (`qai-hub configure --api_token ...`) and network; without
the token qai_hub raises UserError before any network call, which becomes one line here.

Profile shape (qai_hub.client, `InferenceJob.download_profile()`), times in microseconds, memory in bytes:
    {"execution_summary": {"estimated_inference_time": 1234, "estimated_inference_peak_memory": 5242880,
                           "inference_memory_peak_range": [lo, hi], "all_inference_times": [...],
                           "first_load_time": ..., "warm_load_time": ..., ...},
     "execution_detail": [{"name": ..., "type": ..., "compute_unit": "CPU|GPU|NPU", "execution_time": ...}]}
AI Hub runs the encoder only: score + top-k over the gallery is not part of a profile.
"""
from __future__ import annotations

from mcad.device.base import Device, Job, log, memory_summary
from mcad.device.errors import DeviceError, one_line
from mcad.device.runner import summarize_ms

PROFILABLE = ("litert", "onnxruntime")
# AI Hub device names -> the SoC names budgets.yaml uses
HUB_SOC_HINTS = {"galaxy s24": "snapdragon-8-gen-3", "snapdragon 8 gen 3": "snapdragon-8-gen-3",
                 "galaxy s23": "snapdragon-8-gen-2", "snapdragon 8 gen 2": "snapdragon-8-gen-2",
                 "snapdragon 8 elite": "snapdragon-8-elite", "galaxy s25": "snapdragon-8-elite"}


def condensed(msg: str, limit: int = 300) -> str:
    """qai_hub's boxed multi-line message -> one line."""
    parts = []
    for line in str(msg).splitlines():
        line = line.strip().strip("|│┌┐└┘─ ").strip()
        if line:
            parts.append(line)
    return " ".join(parts)[:limit] or one_line(msg)


def parse_profile(profile: dict) -> dict:
    """A profile dict -> {'encode': percentile dict (ms), 'peak_mb', 'peak_range_mb', 'compute_units', ...}."""
    if not isinstance(profile, dict) or "execution_summary" not in profile:
        raise ValueError("qaihub: profile has no execution_summary")
    s = profile["execution_summary"]
    times_us = [t for t in (s.get("all_inference_times") or []) if isinstance(t, (int, float)) and t > 0]
    if times_us:
        enc = summarize_ms([t / 1e3 for t in times_us])
    elif s.get("estimated_inference_time"):
        est = s["estimated_inference_time"] / 1e3
        enc = {"n": 1, "p50": round(est, 4), "p90": None, "p99": None, "mean": round(est, 4),
               "note": "estimated_inference_time only (no per-iteration times in this profile)"}
    else:
        raise ValueError("qaihub: profile has no inference time")
    enc["estimated_ms"] = round(s["estimated_inference_time"] / 1e3, 4) if s.get("estimated_inference_time") else None
    peak = s.get("estimated_inference_peak_memory")
    rng = s.get("inference_memory_peak_range")
    units: dict[str, int] = {}
    for layer in profile.get("execution_detail") or []:
        cu = layer.get("compute_unit", "?")
        units[cu] = units.get(cu, 0) + 1
    return {"encode": enc,
            "peak_mb": round(peak / 2**20, 3) if isinstance(peak, (int, float)) and peak >= 0 else None,
            "peak_range_mb": [round(v / 2**20, 3) for v in rng] if isinstance(rng, (list, tuple)) and len(rng) == 2 else None,
            "first_load_ms": round(s["first_load_time"] / 1e3, 3) if s.get("first_load_time") else None,
            "warm_load_ms": round(s["warm_load_time"] / 1e3, 3) if s.get("warm_load_time") else None,
            "compute_units": units}


class QaiHubDevice(Device):
    kind = "qaihub"

    def __init__(self, device_name: str, options: str = "", iterations: int = 100, timeout_s: float = 3600.0,
                 **_ignored):
        device_name = device_name.strip()
        if not device_name:
            raise DeviceError("qaihub: no device name (qaihub:<device name>, e.g. 'qaihub:Samsung Galaxy S24')")
        super().__init__(f"qaihub:{device_name}", timeout_s)
        self.device_name = device_name
        self.options = options
        self.iterations = int(iterations)
        self._profiles: dict[str, dict] = {}

    def _hub(self):
        try:
            import qai_hub
        except ImportError:
            raise DeviceError("qaihub: the qai-hub package is not installed (pip install qai-hub)") from None
        return qai_hub

    def connect(self) -> dict:
        hub = self._hub()
        try:
            devices = hub.get_devices(name=self.device_name)
        except hub.UserError as e:  # no ~/.qai_hub/client.ini: raised before any network call
            raise DeviceError(f"qaihub: {condensed(e)}") from None
        except Exception as e:  # network, auth
            raise DeviceError(f"qaihub: cannot list devices ({type(e).__name__}: {condensed(e, 200)})") from None
        if not devices:
            raise DeviceError(f"qaihub: no AI Hub device named {self.device_name!r} (`qai-hub list-devices`)")
        self.hub_device = devices[0]
        attrs = list(getattr(self.hub_device, "attributes", []) or [])
        chip = next((a.split(":", 1)[1] for a in attrs if a.startswith("chipset:")), None)
        self.info = {"device": self.name, "kind": self.kind, "soc": chip, "hub_device": self.device_name,
                     "os": getattr(self.hub_device, "os", None), "attributes": attrs}
        return self.info

    def budget_names(self) -> list[str]:
        names = [self.info.get("soc") or "", self.device_name]
        low = self.device_name.lower()
        names += [v for k, v in HUB_SOC_HINTS.items() if k in low]
        return [n for n in names if n]

    def cannot_run(self, runtime: str) -> str | None:
        if runtime in PROFILABLE:
            return None
        return f"qaihub: AI Hub profiles .tflite/.onnx (and its own compiled assets), not {runtime} programs"

    def _profile(self, job: Job) -> dict:
        a = job.artifact
        key = str(a.path)
        if key in self._profiles:
            return self._profiles[key]
        hub = self._hub()
        opts = f"--max_profiler_iterations {self.iterations} {self.options}".strip()
        try:
            submit = getattr(hub, "submit_inference_job", None)
            if submit is not None:
                pj = submit(model=str(a.path), device=self.hub_device, profile=True, options=opts,
                            name=f"mcad-{job.subject}-{a.name}")
            else:  # older qai-hub
                pj = hub.submit_profile_job(model=str(a.path), device=self.hub_device, options=opts,
                                            name=f"mcad-{job.subject}-{a.name}")
            log.info("qaihub: submitted %s for %s", getattr(pj, "job_id", "?"), a.label)
            status = pj.wait()
            if status is not None and hasattr(status, "success") and not status.success:
                raise DeviceError(f"qaihub: profile job {pj.job_id} failed: {one_line(getattr(status, 'message', '') or '')}")
            prof = pj.download_profile()
        except hub.UserError as e:
            raise DeviceError(f"qaihub: {condensed(e)}") from None
        except DeviceError:
            raise
        except Exception as e:
            raise DeviceError(f"qaihub: profiling {a.path.name} failed ({type(e).__name__}: {condensed(e, 200)})") from None
        try:
            parsed = parse_profile(prof)
        except ValueError as e:
            raise DeviceError(str(e)) from None
        parsed["job_id"] = getattr(pj, "job_id", None)
        self._profiles[key] = parsed
        return parsed

    def run(self, job: Job) -> dict:
        a = job.artifact
        if a.runtime not in PROFILABLE:
            raise DeviceError(f"qaihub: {a.path.name}: AI Hub profiles .tflite/.onnx (and its own compiled "
                              f"assets), not {a.runtime} programs")
        parsed = self._profile(job)
        stage = "search" if a.role == "search" else "encode"
        res = {"runner": "qaihub", "stages": {stage: parsed["encode"]}, "runs": parsed["encode"].get("n"),
               "native": {k: v for k, v in parsed.items() if k != "encode"},
               "note": "AI Hub profile: encoder only; threads are AI Hub's choice"}
        row = self.row(job, res, None)
        row["memory"] = memory_summary("native", {"peak_mb": parsed["peak_mb"],
                                                  "source": "AI Hub estimated_inference_peak_memory"}, None)
        row["soc"] = self.info.get("soc")
        return row
