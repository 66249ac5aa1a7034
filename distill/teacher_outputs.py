"""The teachers' outputs for a paired batch, as the student recipe reads them: from the teacher cache
(`distill.cache.TeacherCache.batch`) or by running the teachers (`distill.cache.online_batch`),
placed where the student is."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from mcad.distill.cache import TeacherCache, TeacherOutputs, online_batch
from mcad.preprocess import model_input, same_input, view_of


class Teachers:
    """The teachers' outputs for a batch: from the cache, or by running them; on `device`.
    Online, a step's batch arrives decoded for `feed_images` (the dual teacher's view, which the
    student shares, and the fusion teacher's own where it differs)."""

    def __init__(self, dual, fusion, lists: np.ndarray, cache: TeacherCache | None, with_fusion: bool = True,
                 fusion_ids: np.ndarray | None = None, device: torch.device | None = None, images=None):
        self.dual, self.fusion, self.lists, self.cache = dual, fusion, lists, cache
        self.with_fusion = with_fusion
        self.fusion_ids = fusion_ids  # None: the fusion teacher reads the dual's ids (the mcad teachers)
        self.own_pixels = not same_input(dual, fusion)  # BLIP at 384 beside CLIP at 224, other mean/std
        self.device = device or torch.device("cpu")
        self.images = images  # mcad.data.stream.Images at the dual teacher's view
        self.f_images = images.as_view(view_of(fusion)) if images is not None else None  # F's (the same array: resized)

    @property
    def feed_images(self) -> list:
        """What each step must decode: the dual's view, and F's own where F runs online and sees another."""
        if self.cache is not None or self.images is None:
            return []
        extra = self.cache is None and self.with_fusion and self.own_pixels and self.f_images is not self.images
        return [self.images] + ([self.f_images] if extra else [])

    def __call__(self, batch: list, ids, idx: np.ndarray, cap: np.ndarray) -> TeacherOutputs:
        if self.cache is not None:
            return on_device(self.cache.batch(idx, cap), self.device)
        px = model_input(self.dual, batch[0])
        f_px = model_input(self.fusion, batch[-1]) if self.own_pixels and self.with_fusion else None
        f_ids = torch.as_tensor(self.fusion_ids[cap]) if self.fusion_ids is not None else None
        out = online_batch(self.dual, self.fusion, px, torch.as_tensor(ids[cap]), idx, self.lists, self.with_fusion,
                           f_px=f_px, f_ids=f_ids)
        return on_device(out, self.device)


def on_device(tb: TeacherOutputs, device: torch.device) -> TeacherOutputs:
    """The batch's teacher outputs where the student is (the same tensors on the CPU)."""
    return dataclasses.replace(tb, **{f.name: getattr(tb, f.name).to(device) for f in dataclasses.fields(tb)})
