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


def candidates_with_positive(sim: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """[B, k] column indices per row: the row's own column (the positive, first) and its k-1
    highest-scoring columns of another key (the candidates a re-ranker is shown)."""
    B = sim.shape[0]
    k = min(k, B - int((keys[:, None] == keys[None, :]).sum(1).max()) + 1)
    s = sim.float().masked_fill(keys[:, None] == keys[None, :], float("-inf"))
    neg = s.topk(k - 1, dim=1).indices
    return torch.cat([torch.arange(B)[:, None], neg], dim=1)


def itm_listwise_loss(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """m [B, k] matching logits with the positive in column 0: softmax cross-entropy over each
    list (what re-ranking needs: the positive above its confusers) plus binary cross-entropy
    (a logit that also means match / no match), positives weighted as all negatives together.
    Returns (loss, list accuracy)."""
    B, k = m.shape
    target = torch.zeros_like(m)
    target[:, 0] = 1.0
    weight = torch.ones_like(m)
    weight[:, 0] = float(k - 1)
    ce = torch.nn.functional.cross_entropy(m, torch.zeros(B, dtype=torch.long))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(m, target, weight=weight) * k / (2 * (k - 1))
    return ce + bce, (m.argmax(dim=1) == 0).float().mean()
