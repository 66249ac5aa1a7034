"""What the export stage lowers: a text and/or an image encoder and the sizes their programs are
traced with. Each encoder keeps the contract of mcad.models.dual's encoders, a tower (`.text` or
`.visual`) and a projection (`.proj`), forward = l2_normalize(proj(tower(x))): the quantizers take
it apart there (mcad.quantize.pt2e.Core) so the normalisation stays float. The run's student is one
(`Towers.of`); the bench's peers are others, built through the same code."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mcad.data.images import DEFAULT_MEAN, DEFAULT_STD
from mcad.data.stream import View
from mcad.preprocess import view_of


@dataclass
class Towers:
    name: str
    text_encoder: nn.Module | None
    image_encoder: nn.Module | None
    embed_dim: int
    context_length: int = 0          # 0: no text tower
    image_size: int = 0              # 0: no image tower
    eot_id: int = 2                  # the example ids a text program is traced with end here
    image_mean: tuple = DEFAULT_MEAN
    image_std: tuple = DEFAULT_STD
    view: View | None = None         # how image files are decoded for it (None: mcad's square rule at image_size)

    @classmethod
    def of(cls, model) -> "Towers":
        """A DualEncoder's two shipped encoders."""
        return cls(name=model.config.get("name", "?"), text_encoder=model.text_encoder().eval(),
                   image_encoder=model.image_encoder().eval(), embed_dim=int(model.embed_dim),
                   context_length=int(model.context_length), image_size=int(model.image_size),
                   eot_id=int(model.text.eot_id), image_mean=tuple(model.image_mean),
                   image_std=tuple(model.image_std), view=view_of(model))

    @property
    def roles(self) -> tuple[str, ...]:
        """The programs these towers make (search = text encoder + a gallery of image embeddings)."""
        text, image = self.text_encoder is not None, self.image_encoder is not None
        return tuple(r for r, ok in (("text", text), ("image", image), ("search", text and image)) if ok)

    def encoder(self, role: str) -> nn.Module:
        return self.text_encoder if role in ("text", "search") else self.image_encoder
