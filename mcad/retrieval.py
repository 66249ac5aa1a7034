"""Image-text retrieval metrics with several captions per image (the Flickr30K/COCO protocol).

image->text: a hit at K when any of the image's captions is in its top K.
text->image: a hit at K when the caption's own image is in its top K.
Ties are broken pessimistically (a tied wrong item ranks ahead of the right one), so a constant
model never scores above chance; NaN scores count as wrong.
"""
from __future__ import annotations

import numpy as np
import torch

KS = (1, 5, 10)


def _rank_of_first_hit(sim: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """For each row: 0-based rank of the best-scoring positive, counting every non-positive that
    scores >= it (pessimistic ties). sim, positive: [R, C].

    NaN is the worst case on both sides: a NaN positive never hits, a NaN non-positive ranks ahead
    (otherwise a diverged model with all-NaN scores would get R@1 = 100)."""
    nan = torch.isnan(sim)
    best_pos = torch.where(positive & ~nan, sim, torch.full_like(sim, -torch.inf)).amax(dim=1, keepdim=True)
    return (((sim >= best_pos) | nan) & ~positive).sum(dim=1)


def ranks(sim, caption_to_image, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(i2t ranks [n_images], t2i ranks [n_captions]) from sim [n_images, n_captions]."""
    sim = torch.as_tensor(np.asarray(sim, dtype=np.float32) if not torch.is_tensor(sim) else sim).float()
    c2i = torch.as_tensor(np.asarray(caption_to_image), dtype=torch.long)
    n_img, n_txt = sim.shape
    if c2i.shape != (n_txt,):
        raise ValueError(f"caption_to_image has shape {tuple(c2i.shape)}, expected ({n_txt},)")
    i2t = []
    for s in range(0, n_img, chunk):
        rows = torch.arange(s, min(s + chunk, n_img))
        i2t.append(_rank_of_first_hit(sim[rows], c2i[None, :] == rows[:, None]))
    t2i = []
    simT = sim.T
    for s in range(0, n_txt, chunk):
        cols = torch.arange(s, min(s + chunk, n_txt))
        pos = torch.arange(n_img)[None, :] == c2i[cols][:, None]
        t2i.append(_rank_of_first_hit(simT[cols], pos))
    return torch.cat(i2t).numpy(), torch.cat(t2i).numpy()


def metrics_from_ranks(i2t: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in KS:
            out[f"{name}_r{k}"] = float(100.0 * (r < k).mean())
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in KS))
    return out


def retrieval_metrics(sim, caption_to_image) -> dict[str, float]:
    return metrics_from_ranks(*ranks(sim, caption_to_image))


def rerank_metrics(sim, caption_to_image, rerank_i2t, rerank_t2i, k: int) -> dict[str, float]:
    """Metrics after re-ranking each row's top-k (by `sim`) with another scorer.

    rerank_i2t(img_idx [n], txt_idx [n]) -> scores [n] for pairs; likewise rerank_t2i. Items
    outside the top-k keep their order below the re-ranked ones (scores shifted down)."""
    sim = torch.as_tensor(np.asarray(sim, dtype=np.float32) if not torch.is_tensor(sim) else sim).float()
    n_img, n_txt = sim.shape
    k_i2t, k_t2i = min(k, n_txt), min(k, n_img)

    def reranked(mat: torch.Tensor, kk: int, scorer, transpose: bool) -> torch.Tensor:
        top = mat.topk(kk, dim=1).indices  # [R, kk]
        rows = torch.arange(mat.shape[0])[:, None].expand_as(top)
        a, b = (top.reshape(-1), rows.reshape(-1)) if transpose else (rows.reshape(-1), top.reshape(-1))
        scores = torch.as_tensor(np.asarray(scorer(a.numpy(), b.numpy()), dtype=np.float32)).view_as(top)
        # Everything outside the top-k sits below every re-ranked item, in its old order.
        out = mat - mat.max() - 1.0 + (scores.min() - 1.0 if scores.numel() else 0.0)
        out = out.scatter(1, top, scores)
        return out

    i2t_sim = reranked(sim, k_i2t, rerank_i2t, transpose=False)          # [n_img, n_txt]
    t2i_sim = reranked(sim.T.contiguous(), k_t2i, rerank_t2i, transpose=True)  # [n_txt, n_img]
    i2t, _ = ranks(i2t_sim, caption_to_image)
    _, t2i = ranks(t2i_sim.T, caption_to_image)
    return metrics_from_ranks(i2t, t2i)


def recall_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table of retrieval metrics, one row per model."""
    cols = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in KS] + ["rsum"]
    head = "| model | " + " | ".join(c.replace("_r", " R@") for c in cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    body = ["| " + name + " | " + " | ".join(f"{m.get(c, float('nan')):.1f}" for c in cols) + " |"
            for name, m in rows.items()]
    return "\n".join([head, sep, *body])
