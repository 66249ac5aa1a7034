"""Dual-stream (CLIP-style) model: separate image and text encoders meeting in one embedding space.
Used for the student and for the dual-stream teacher."""
from __future__ import annotations

import math

import torch
from torch import nn

from mcad.data.images import DEFAULT_MEAN, DEFAULT_STD
from mcad.models.layers import l2_normalize
from mcad.models.towers import build_image_tower, build_text_tower


class DualEncoder(nn.Module):
    kind = "dual"

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        self.visual = build_image_tower(config["image"])
        self.text = build_text_tower(config["text"])
        dim = int(config["embed_dim"])
        self.embed_dim = dim
        self.image_proj = nn.Linear(self.visual.width, dim, bias=False)
        self.text_proj = nn.Linear(self.text.width, dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.get("init_temperature", 0.07))))
        self.image_size = int(config["image"].get("image_size", 64))
        self.context_length = int(config["text"]["context_length"])
        self.image_mean = tuple(config.get("image_mean", DEFAULT_MEAN))
        self.image_std = tuple(config.get("image_std", DEFAULT_STD))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.image_proj(self.visual(pixels))
        return l2_normalize(x) if normalize else x

    def encode_text(self, ids: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_proj(self.text(ids))
        return l2_normalize(x) if normalize else x

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor):
        return self.encode_image(pixels), self.encode_text(ids), self.logit_scale.exp().clamp(max=100.0)

    def image_encoder(self) -> nn.Module:
        return ImageEncoder(self)

    def text_encoder(self) -> nn.Module:
        return TextEncoder(self)


class ImageEncoder(nn.Module):
    """What ships for gallery indexing: pixels [B,3,H,W] (normalised) -> unit embeddings [B,D]."""

    def __init__(self, model: DualEncoder):
        super().__init__()
        self.visual, self.proj = model.visual, model.image_proj

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.proj(self.visual(pixels)))


class TextEncoder(nn.Module):
    """What ships for queries: token ids [B,L] (int64) -> unit embeddings [B,D]."""

    def __init__(self, model: DualEncoder):
        super().__init__()
        self.text, self.proj = model.text, model.text_proj

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.proj(self.text(ids)))
