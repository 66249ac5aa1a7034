"""The export backends, one module each, and the one table of which target ships which.

As ExecuTorch's examples keep one script per backend, each backend here is one module,
`mcad.export.backends.<name>`, with
- `file_name(role, job) -> str`: the file it writes for a role (text, image, search);
- `missing() -> str | None`: why this machine cannot make its files (an SDK, credentials), or None;
- `build(job)`: its artifacts for the job's roles, written through `job.write` (or `job.skip` with
  the reason one cannot be made here).
The modules import their toolchains only inside `build`, so reading this table costs nothing.

The target names are core's (`mcad.paths.TARGETS`), re-exported here for the exporter's own modules."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from mcad.paths import TARGETS  # noqa: F401  (re-exported: the one list of target names is core's)

DEFAULT_SOC = {"snapdragon": "SM8650", "dimensity": "mt6989"}  # soc= unset (cpu: none recorded)


@dataclass(frozen=True)
class Backend:
    name: str                   # its module under mcad.export.backends
    runtime: str                # what runs its files (mcad.runtimes; "qnn": AI Hub's context binaries)
    targets: tuple[str, ...]    # the targets that ship it
    label: str = ""             # the manifest's `backend` (default: name)
    on_request: bool = False    # made only when asked for (hub=1)

    @property
    def manifest_name(self) -> str:
        return self.label or self.name


# Build order inside a target: the NPU artifact the target is for first, the CPU ones after, AI Hub
# last (it compiles the ONNX files this export wrote).
BACKENDS = (
    Backend("qnn", "executorch", ("snapdragon",)),
    Backend("tflite_full", "litert", ("dimensity",), label="tflite"),
    Backend("xnnpack", "executorch", ("cpu", "snapdragon", "dimensity")),
    Backend("onnx", "onnxruntime", ("cpu", "snapdragon")),
    Backend("tflite", "litert", ("cpu", "snapdragon")),
    Backend("mediatek", "executorch", ("dimensity",)),
    Backend("hub", "qnn", ("snapdragon",), on_request=True),
)
BY_NAME = {b.name: b for b in BACKENDS}


def plan(target: str, hub: bool = True) -> tuple[str, ...]:
    """The backends `target` ships, in build order (AI Hub only with `hub`)."""
    return tuple(b.name for b in BACKENDS if target in b.targets and (hub or not b.on_request))


def module(name: str) -> ModuleType:
    """The module that builds backend `name`."""
    return importlib.import_module(f"{__name__}.{name}")
