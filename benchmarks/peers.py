"""Peer towers as plain modules (module-level classes, so a built module pickles into the export
subprocess): CLIP's text tower and MobileViT's image tower, unit-norm outputs.

Both keep the student encoders' contract (a `.text` / `.visual` tower and a `.proj`, forward =
l2_normalize(proj(tower(x)))), so mcad.export lowers and quantizes them exactly as it does the
student (mcad.export.encoders)."""
from __future__ import annotations

import torch
from torch import nn

from mcad.models.layers import l2_normalize


class _Pooled(nn.Module):
    """x -> a transformers model's pooled output, the model called with x as `arg`."""

    def __init__(self, model: nn.Module, arg: str):
        super().__init__()
        self.m, self.arg = model, arg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.m(**{self.arg: x}).pooler_output


class ClipTextTower(nn.Module):
    """ids [1,77] -> unit text_embeds [1,512] (HF CLIP pools at the eos token, then projects)."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        m = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()
        self.text, self.proj = _Pooled(m.text_model, "input_ids"), m.text_projection  # pools at the eos token

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.proj(self.text(ids)))


class MobileViTTower(nn.Module):
    """pixels [1,3,S,S] -> unit pooled features [1,640] (no projection head: `proj` is the identity)."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import MobileViTConfig, MobileViTModel

        self.visual = _Pooled(MobileViTModel(MobileViTConfig(**config)).eval(), "pixel_values")
        self.proj = nn.Identity()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.proj(self.visual(pixels)))
