"""Losses shared by the teacher and student recipes."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor,
              keys: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matched rows. With `keys`, other rows with the same key
    (duplicate descriptions) are masked out instead of being pushed away as negatives."""
    logits = scale * img @ txt.T
    if keys is not None:
        dup = (keys[:, None] == keys[None, :]) & ~torch.eye(len(keys), dtype=torch.bool, device=keys.device)
        logits = logits.masked_fill(dup, -1e4)
    target = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def sample_hard_negatives(sim: torch.Tensor, keys: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each row, a column drawn with probability softmax(sim) among columns of another key
    (ALBEF's hard-negative mining)."""
    w = sim.float().softmax(dim=1).masked_fill(keys[:, None] == keys[None, :], 0.0) + 1e-12
    w = w.masked_fill(keys[:, None] == keys[None, :], 0.0)
    return torch.multinomial(w, 1, generator=generator).squeeze(1)
