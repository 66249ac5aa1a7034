"""How activations are ranged when the encoders are quantized: one record that every quantizer
path reads, so a study can compare recipes and the defaults are stated in one place.

The parity bars judge the worst test input (cosine min), so the ranges must cover the inputs a
user's data brings, not only the bulk of the calibration draw:

- `act_observer`: PT2E activation observers (XNNPACK, LiteRT). "histogram" (the quantizers' own
  default) picks the range that minimises the mean squared error over the calibration draw, which
  clips the tail: a dense, saturated image outside that bulk is clipped in every layer. "minmax"
  takes the whole range the calibration saw: no clipping, coarser steps for every other image.
  Neither holds both on real images (benchmarks/results/quant_sensitivity.md): the default stays
  the quantizers' own.
- `calib_views`: extra views of each calibration image fed to the observers ("flip": mirrored),
  so the ranges see more of the data's spatial statistics at no cost in data.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

ACT_OBSERVERS = ("minmax", "histogram")
VIEWS = ("flip",)


@dataclass(frozen=True)
class Recipe:
    act_observer: str = "histogram"
    calib_views: tuple[str, ...] = ()

    def __post_init__(self):
        if self.act_observer not in ACT_OBSERVERS:
            raise ValueError(f"act_observer={self.act_observer!r}: expected one of {', '.join(ACT_OBSERVERS)}")
        bad = [v for v in self.calib_views if v not in VIEWS]
        if bad:
            raise ValueError(f"calib_views={','.join(bad)}: unknown view (known: {', '.join(VIEWS)})")

    def with_(self, **kw) -> "Recipe":
        return replace(self, **kw)

    def describe(self) -> str:
        views = "+".join(self.calib_views) or "none"
        return f"activation ranges {self.act_observer}, calibration views {views}"


DEFAULT = Recipe()
