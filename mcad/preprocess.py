"""What a model sees of a decoded image batch, and the record of it that travels with a student.

Images are decoded once per split (`mcad.data.images.decode_image`: centre crop to a square, bicubic
resize) at the dual teacher's size, which the student shares. Each model then standardises them with
its own mean/std; a model of another size (BLIP-ITM at 384 beside CLIP at 224) gets them resized
(bicubic, antialiased) from that array: one decoded array per split, not one per teacher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mcad.data.images import normalize

RESIZE = "centre crop to a square, then bicubic resize to image_size (mcad.data.images.decode_image)"


def model_input(model, pixels_uint8) -> torch.Tensor:
    """uint8 [B,3,S,S] -> float32 [B,3,s,s] standardised with the model's mean/std at its size s."""
    x = normalize(pixels_uint8, model.image_mean, model.image_std)
    size = int(getattr(model, "image_size", x.shape[-1]))
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x


def same_input(a, b) -> bool:
    """Whether two models see the same tensor of an image (same size, mean and std)."""
    return (int(a.image_size), tuple(map(float, a.image_mean)), tuple(map(float, a.image_std))) == \
        (int(b.image_size), tuple(map(float, b.image_mean)), tuple(map(float, b.image_std)))


def record(model) -> dict:
    """The preprocessing a student's inputs need, as the run folder records it."""
    return {"image_size": int(model.image_size), "image_mean": [float(v) for v in model.image_mean],
            "image_std": [float(v) for v in model.image_std], "resize": RESIZE, "layout": "RGB, [B, 3, S, S], /255"}
