"""MCAD losses (docs/method.md). Shapes: a batch of N matched pairs; S is [N images, N texts].

Teacher side: dual-teacher similarities S^D, the fusion teacher's ITM logits m over each row's
top-k candidates C_i (and each column's), and its fused features: h of the matched pairs
(`loss.fused=matched`), or, per image and per caption, F's fused features over its candidates
weighted by F's own match probability (`loss.fused=candidates`, see `candidate_mix`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mcad.models.layers import l2_normalize


class FusionAdapters(nn.Module):
    """A_img, A_txt: fused feature h -> the dual teacher's space (trained once, teachers frozen)."""

    def __init__(self, h_dim: int, dim: int):
        super().__init__()
        self.img = nn.Linear(h_dim, dim, bias=False)
        self.txt = nn.Linear(h_dim, dim, bias=False)
        nn.init.zeros_(self.img.weight)  # start as the plain dual teacher
        nn.init.zeros_(self.txt.weight)

    def forward(self, v: torch.Tensor, t: torch.Tensor, h: torch.Tensor, lam: float,
                h_txt: torch.Tensor | None = None):
        """ṽ = normalize(v + λ A_img h), t̃ = normalize(t + λ A_txt h'), h' = `h_txt` when given
        (each side its own fused feature), else h."""
        h_txt = h if h_txt is None else h_txt
        return l2_normalize(v + lam * self.img(h)), l2_normalize(t + lam * self.txt(h_txt))


# Which fused features the modified teacher features fold in (`loss.fused`):
#   matched:    h(I_i, T_i) of the pair the batch drew, on both sides. It carries that caption, so
#               ṽ_i leans toward whichever of image i's captions the step drew (docs/method.md).
#   candidates: image side Σ_j softmax_j(m(I_i, T_j)/τ_F) h(I_i, T_j) over every caption of every
#               image in i's candidate list; text side the same over each caption's candidate
#               images. Fixed per image and per caption, whatever the batch drew.
FUSED = ("matched", "candidates")


def candidate_mix(h: torch.Tensor, m: torch.Tensor, valid: torch.Tensor, tau_f: float) -> torch.Tensor:
    """Σ_j softmax_j(m_j/τ_F) h_j over each row's valid candidates: h [..., K, W], m and valid
    [..., K] -> [..., W]. Entries that are not valid (NaN padding included) count for nothing; a
    row with none (a padded caption slot) gives zeros."""
    w = (m / tau_f).masked_fill(~valid, float("-inf")).softmax(-1).nan_to_num(0.0)
    return (w.unsqueeze(-1) * h.masked_fill(~valid.unsqueeze(-1), 0.0)).sum(-2)


def fused_features(tb, fused: str = "matched") -> tuple[torch.Tensor, torch.Tensor]:
    """(image-side, text-side) fused features of a batch's teacher outputs (distill.cache.TeacherOutputs)
    in the `fused` form."""
    if fused == "matched":
        return tb.h, tb.h
    if fused != "candidates":
        raise ValueError(f"loss.fused={fused!r}: expected one of {', '.join(FUSED)}")
    if tb.h_img.numel() == 0 or tb.h_txt.numel() == 0:
        raise ValueError("loss.fused=candidates: the teacher outputs hold no fused features over the candidates "
                         "(a teacher cache of format 2, or teachers run without them)")
    return tb.h_img, tb.h_txt


def modified_features(adapters: FusionAdapters, tb, lam: float, fused: str = "matched"):
    """ṽ, t̃ of a batch: D's features with λ times the adapted fused features of the `fused` form."""
    h_img, h_txt = fused_features(tb, fused)
    return adapters(tb.v, tb.t, h_img, lam, h_txt)


def candidates(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Each row's top-k columns under `sim`, with the matched column (the diagonal) always in."""
    k = min(k, sim.shape[1])
    cand = sim.topk(k, dim=1).indices
    diag = torch.arange(sim.shape[0], device=sim.device)
    has = (cand == diag[:, None]).any(dim=1)
    cand[~has, -1] = diag[~has]
    return cand


def dense(cand: torch.Tensor, values: torch.Tensor, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index form (cand [R, k], values [R, k]) -> mask form (mask [R, n_cols], values [R, n_cols])."""
    mask = torch.zeros(cand.shape[0], n_cols, dtype=torch.bool, device=cand.device).scatter_(1, cand, True)
    full = torch.zeros(cand.shape[0], n_cols, dtype=values.dtype, device=values.device).scatter_(1, cand, values)
    return mask, full


# Candidate sets are masks: with fixed candidate lists (the teacher cache) a row has as many
# candidates as its list members that made it into the batch, not a fixed k.
NEG = -1e9  # finite "minus infinity" for masked logits (no 0 * inf NaNs in the KL)


def reassign_by_order(scores: torch.Tensor, order_scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Order from one teacher, scale from the other: for each row, the r-th largest of `scores`
    goes to the element that `order_scores` ranks r-th, among the row's `mask`ed entries (all when
    no mask); other entries keep their score."""
    if mask is None:
        values = scores.sort(dim=1, descending=True).values
        rank_pos = order_scores.argsort(dim=1, descending=True, stable=True)
        return torch.empty_like(scores).scatter_(1, rank_pos, values)
    values = scores.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True).values
    rank_pos = order_scores.masked_fill(~mask, float("-inf")).argsort(dim=1, descending=True, stable=True)
    out = torch.empty_like(scores).scatter_(1, rank_pos, values)
    return torch.where(mask, out, scores)


def split_by_fusion(s_dual: torch.Tensor, mask: torch.Tensor, m: torch.Tensor, tau: float, tau_f: float) -> torch.Tensor:
    """Row-wise scores (S units) whose softmax at τ_kd gives each row's candidates (`mask`) the
    total mass D gives them, split among them as softmax(m/τ_F) splits it; elsewhere D's scores.
    When D's scores over the candidates are tied (D cannot tell a scene from its relation swap),
    handing them out in F's order changes nothing; this still says which one F believes."""
    z = s_dual / tau
    lse_c = z.masked_fill(~mask, float("-inf")).logsumexp(1, keepdim=True)
    lf = (m / tau_f).masked_fill(~mask, float("-inf")).log_softmax(1)
    return tau * torch.where(mask, lse_c + lf, z)


WITHIN = ("order", "split")


def modified_similarity(s_dual: torch.Tensor, mask: torch.Tensor, m: torch.Tensor, mu: float,
                        feat_term: torch.Tensor | None = None, within: str = "order",
                        tau: float = 0.05, tau_f: float = 1.0) -> torch.Tensor:
    """Row-wise S̃: within each row's candidates (`mask`), (1-μ)·S^D + μ·F's version of them, which
    is D's scores in F's order by the ITM logits `m` (`within="order"`) or D's candidate mass split
    by F (`within="split"`, see split_by_fusion); elsewhere S^D. `feat_term` is added everywhere."""
    if within == "order":
        fused = reassign_by_order(s_dual, m, mask)
    elif within == "split":
        fused = split_by_fusion(s_dual, mask, m, tau, tau_f)
    else:
        raise ValueError(f"loss.within={within!r}: expected one of {', '.join(WITHIN)}")
    out = torch.where(mask, (1 - mu) * s_dual + mu * fused, s_dual)
    if feat_term is not None:
        out = out + feat_term
    return out


def kl_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """mean_i KL(softmax(t_i/τ) ‖ softmax(s_i/τ)) · τ²."""
    p = F.softmax(teacher_logits / tau, dim=1)
    return tau * tau * (p * (F.log_softmax(teacher_logits / tau, dim=1) - F.log_softmax(student_logits / tau, dim=1))).sum(1).mean()


def distribution_loss(s_student: torch.Tensor, target_i2t: torch.Tensor, target_t2i: torch.Tensor, tau: float) -> torch.Tensor:
    """τ² · ½ [KL(P̃^{i2t} ‖ P^{i2t}) + KL(P̃^{t2i} ‖ P^{t2i})]; t2i distributions run over columns."""
    return 0.5 * (kl_rows(target_i2t, s_student, tau) + kl_rows(target_t2i.T, s_student.T, tau))


def single_teacher_loss(s_student: torch.Tensor, mask_i2t, m_i2t, mask_t2i, m_t2i, tau: float, tau_f: float) -> torch.Tensor:
    """Distribution distillation from the ITM logits alone, over each row's candidates only.
    i2t: [images, texts]; t2i: [texts, images] (rows are the queries)."""
    def part(s, mask, m):
        return kl_rows((m / tau_f * tau).masked_fill(~mask, NEG), s.masked_fill(~mask, NEG), tau)
    return 0.5 * (part(s_student, mask_i2t, m_i2t) + part(s_student.T, mask_t2i, m_t2i))


def feature_loss(u_proj: torch.Tensor, w_proj: torch.Tensor, v_t: torch.Tensor, t_t: torch.Tensor) -> torch.Tensor:
    """‖B_img u − ṽ‖² + ‖B_txt w − t̃‖², mean over the batch."""
    return ((u_proj - v_t) ** 2).sum(1).mean() + ((w_proj - t_t) ** 2).sum(1).mean()


def mcad_targets(v: torch.Tensor, t: torch.Tensor, v_mod: torch.Tensor | None, t_mod: torch.Tensor | None,
                 mask_i2t, m_i2t, mask_t2i, m_t2i, mu: float, within: str = "order", tau: float = 0.05,
                 tau_f: float = 1.0):
    """(S̃ for image->text rows, S̃ for text->image columns) from the teachers' outputs.
    mask_i2t/m_i2t: [images, texts]; mask_t2i/m_t2i: [texts, images]."""
    s_d = v @ t.T
    feat = None
    if v_mod is not None and t_mod is not None:
        feat = 0.5 * (v_mod @ t.T + v @ t_mod.T) - s_d
    kw = {"within": within, "tau": tau, "tau_f": tau_f}
    s_i2t = modified_similarity(s_d, mask_i2t, m_i2t, mu, feat, **kw)
    s_t2i = modified_similarity(s_d.T, mask_t2i, m_t2i, mu, None if feat is None else feat.T, **kw).T
    return s_i2t, s_t2i


# -- shared by the teacher and the student recipes ---------------------------------------------
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
