"""What a model sees of an image, and the record of it that travels with a student.

Each model has a view (`view_of`, mcad.data.stream.View): its size and resize rule. mcad's own models
centre-crop to a square and resize; a CLIP teacher resizes the shortest edge and centre-crops, as its
image processor does; a BLIP-ITM teacher resizes to a square without cropping. Image files are
decoded per view (mcad.data.stream), so a teacher of another size or rule (BLIP at 384 beside CLIP at
224) sees the file as its own processor would. The student sees what the dual teacher sees, and
its run folder and exports record that view. A decoded array (the synthetic set's pixel cache) is
one view; other sizes are resized from it (bicubic, antialiased) by `model_input`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mcad.data.images import normalize
from mcad.data.stream import View


def view_of(model) -> View:
    """The view a model was trained with: its own `image_view`, else mcad's square rule at its size."""
    view = getattr(model, "image_view", None)
    return view if isinstance(view, View) else View(int(model.image_size))


def model_input(model, pixels_uint8) -> torch.Tensor:
    """uint8 [B,3,S,S] -> float32 [B,3,s,s] standardised with the model's mean/std at its size s."""
    x = normalize(pixels_uint8, model.image_mean, model.image_std)
    size = int(getattr(model, "image_size", x.shape[-1]))
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x


def same_input(a, b) -> bool:
    """Whether two models see the same tensor of an image (same view, mean and std)."""
    return (view_of(a), tuple(map(float, a.image_mean)), tuple(map(float, a.image_std))) == \
        (view_of(b), tuple(map(float, b.image_mean)), tuple(map(float, b.image_std)))


def record(model, view: View | None = None) -> dict:
    """The preprocessing a student's inputs need, as the run folder and its exports record it."""
    view = view or view_of(model)
    return {"image_size": int(model.image_size), "image_mean": [float(v) for v in model.image_mean],
            "image_std": [float(v) for v in model.image_std], "resize": view.describe(),
            "resize_mode": view.mode, "resize_to": int(view.resize or view.size),
            "layout": "RGB, [B, 3, S, S], /255"}


def view_of_record(rec: dict | None, size: int) -> View:
    """The view a run's (or an export's) preprocessing record names; square at `size` when absent."""
    if not rec or "resize_mode" not in rec:
        return View(int(size))
    return View.from_record({**rec, "image_size": int(rec.get("image_size") or size)})
