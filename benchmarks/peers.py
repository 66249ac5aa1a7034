"""Peer towers as plain modules (module-level classes, so a built module pickles into the artifact
builder's subprocess): CLIP's text tower and MobileViT's image tower, unit-norm outputs."""
from __future__ import annotations

import torch
from torch import nn


class ClipTextTower(nn.Module):
    """ids [1,77] -> unit text_embeds [1,512] (HF CLIP pools at the eos token, then projects)."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        self.m = CLIPTextModelWithProjection(CLIPTextConfig(**config)).eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        e = self.m(input_ids=ids).text_embeds
        return e / e.norm(dim=-1, keepdim=True)


class MobileViTTower(nn.Module):
    """pixels [1,3,S,S] -> unit pooled features [1,640] (no projection head)."""

    def __init__(self, config: dict):
        super().__init__()
        from transformers import MobileViTConfig, MobileViTModel

        self.m = MobileViTModel(MobileViTConfig(**config)).eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        e = self.m(pixel_values=pixels).pooler_output
        return e / e.norm(dim=-1, keepdim=True)
