"""`mcad export`'s options: one dataclass, checked once, when it is made (the CLI, the bench, search's
`bind=` and the tests all make one), so bad input is one line before any work. mcad/configs/export.yaml
sets the recipe's values over these defaults (export.cli.defaults)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mcad.export.backends import DEFAULT_SOC, TARGETS, plan
from mcad.export.programs import ROLES

NPU_SCHEMES = {16: "a16w8", 8: "int8"}  # npu_activation_bits -> the full-integer TFLite's file-name scheme


@dataclass
class Options:
    target: str = "cpu"             # one of backends.TARGETS
    run: str | Path | None = None   # None: the newest run folder
    data: Any = None                # None: the data the run was trained on (its manifest's data: spec)
    out: str | Path | None = None   # None: runs/<name>/export/<target> (pipeline.default_out)
    calib: int = 256                # calibration images (+ one caption each), a seeded draw from the train split
    strict: bool = False            # an artifact this machine cannot make (no SDK) is an error, not a skip
    hub: bool = False               # snapdragon: also compile on Qualcomm AI Hub
    soc: str | None = None          # None: the target's default (backends.DEFAULT_SOC)
    keep_fp32: Any = None           # None: each quantizer's default (mcad.quantize.pt2e.DEFAULT_KEEP_FP32)
    precision: str = "int8"         # int8 | fp32
    parity: bool = True             # run every artifact in its runtime against the eager fp32 student
    parity_images: int = 0          # test-split images for parity (0: the whole split)
    queries: int = 16               # search-program queries compared with brute force
    # full-integer TFLite and QNN's image encoder: 16 (A16W8: NeuroPilot, QNN HTP) or 8 (A8W8: NNAPI-only NPUs)
    npu_activation_bits: int = 16
    # a subset of the target's backends (the gate exports backends=xnnpack,tflite; the bench one
    # runtime per variant); None: the target's whole plan
    backends: tuple[str, ...] | None = None
    # a subset of text, image, search (`mcad index bind=` makes text + search, the bench the encoders)
    roles: tuple[str, ...] = ROLES
    # bind this gallery (.npy of unit rows [N, D], or random:N) into the XNNPACK and LiteRT search
    # programs (export.bound; an index folder: `mcad index ... bind=<target>`); default out:
    # runs/<name>/export/<target>-bound
    gallery: str | Path | None = None
    bound_dtype: str = "int8"       # ExecuTorch's bound gallery: int8 | fp32 (LiteRT binds fp32)
    any_gallery_search: bool = False  # also the XNNPACK / LiteRT search programs with a run-time gallery
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        self.target = str(self.target or "cpu").lower()
        if self.target not in TARGETS:
            raise ValueError(f"target={self.target}: unknown target (one of {', '.join(TARGETS)})")
        if self.precision not in ("int8", "fp32"):
            raise ValueError(f"precision={self.precision!r}: expected int8 or fp32")
        if self.npu_activation_bits not in NPU_SCHEMES:
            raise ValueError(f"npu_activation_bits={self.npu_activation_bits}: expected 16 (A16W8) or 8 (A8W8)")
        if self.bound_dtype not in ("int8", "fp32"):
            raise ValueError(f"bound_dtype={self.bound_dtype!r}: expected int8 or fp32")
        if self.calib < 1:
            raise ValueError(f"calib={self.calib}: need at least one calibration sample")
        self.parity_images = self.parity_images or 0
        self._check_roles_and_backends()
        from mcad.quantize.pt2e import parse_keep

        parse_keep(self.keep_fp32)  # unknown names: one line, before any work
        if "mediatek" in self.plan():
            from mcad.export.backends.mediatek import PLATFORMS

            if self.soc_name.lower() not in PLATFORMS:
                raise ValueError(f"soc={self.soc_name}: unknown Dimensity platform ({', '.join(PLATFORMS)})")

    def _check_roles_and_backends(self) -> None:
        roles = tuple(self.roles or ROLES)
        if set(roles) - set(ROLES):
            raise ValueError(f"roles={','.join(roles)}: expected a subset of {', '.join(ROLES)}")
        self.roles = tuple(r for r in ROLES if r in roles)
        self.backends = tuple(self.backends) if self.backends else None
        full = plan(self.target)
        unknown = set(self.backends or ()) - set(full)
        if unknown:
            raise ValueError(f"backends={','.join(sorted(unknown))}: not part of target {self.target} "
                             f"({', '.join(full)})")
        if self.gallery and "search" not in self.roles:
            raise ValueError(f"gallery={self.gallery}: binds a gallery into the search programs, and roles= has none")

    @property
    def soc_name(self) -> str:
        """The SoC / platform the artifacts are for (soc=, else the target's default)."""
        return str(self.soc or DEFAULT_SOC.get(self.target, "SM8650"))

    @property
    def npu_scheme(self) -> str:
        return NPU_SCHEMES[self.npu_activation_bits]

    def plan(self) -> tuple[str, ...]:
        """The backends this export builds, in order: the target's (AI Hub with hub=1), less those
        backends= leaves out."""
        return tuple(b for b in plan(self.target, hub=self.hub) if not self.backends or b in self.backends)
