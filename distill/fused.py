"""The fused-feature path of the student recipe: off by default (`loss.lam: 0`), set up only when on.

With λ > 0 the modified teacher features ṽ = normalize(v + λ A_img h), t̃ = normalize(t + λ A_txt h')
fold F's fused features into D's (docs/method.md, "Teacher features, modified"). Turning it on
costs three things, none of which a λ = 0 run pays:
- F's fused features in the teacher outputs: the cache must hold them (a cache built with
  λ = 0 does not, and is refused with the command that rebuilds it), or, online with
  `loss.fused=candidates`, F runs over every candidate list of the batch (`WithCandidateFeatures`);
- the fusion adapters A_img, A_txt, fitted once before the student (`fit_adapters`);
- the feature term of the modified similarity (`distill.losses.mcad_targets`).
"""
from __future__ import annotations

import numpy as np
import torch

from mcad.data.stream import StepFeed
from mcad.distill.cache import TeacherOutputs, caption_table, online_candidate_features
from mcad.distill.losses import NEG, FusionAdapters, kl_rows, modified_features
from mcad.distill.sampling import caption_choice
from mcad.distill.trainer import Trainer
from mcad.preprocess import model_input


def fused_on(variant: str, lam: float) -> bool:
    """Whether a run reads F's fused features: MCAD with λ > 0 (the other variants zero λ)."""
    return variant == "mcad" and lam > 0


def setup_fused(cfg: dict, teacher_out, cache, ids: np.ndarray, caps: list[list[int]], n_images: int, batches,
                seed: int, progress: bool = True):
    """(teacher outputs that carry the fused features the run reads, the fitted adapters). A cache
    is checked for them; online, `loss.fused=candidates` runs F over the candidate lists here."""
    L = cfg["loss"]
    fused, tau_f = str(L.get("fused", "matched")), float(L["tau_f"])
    if cache is not None:
        cache.check_fused(tau_f, fused, float(L["lam"]))
    elif fused == "candidates":  # F over the candidate lists, run here
        f_ids = teacher_out.fusion_ids if teacher_out.fusion_ids is not None else ids
        f_images, fusion = teacher_out.f_images, teacher_out.fusion
        teacher_out = WithCandidateFeatures(teacher_out, caption_table(caps), tau_f,
                                            lambda j: model_input(fusion, f_images[j]), f_ids)
    adapters = fit_adapters(cfg, teacher_out, teacher_out.fusion.width, teacher_out.dual.embed_dim, n_images, ids,
                            caps, batches, seed, progress)
    return teacher_out, adapters


class WithCandidateFeatures:
    """Online teachers plus F's fused features over each image's and caption's candidate list
    (loss.fused=candidates; a cache holds them, distill.cache.online_candidate_features runs F)."""

    def __init__(self, teachers, cap_table: np.ndarray, tau_f: float, image_input, f_ids: np.ndarray):
        self.teachers, self.cap_table, self.tau_f = teachers, cap_table, tau_f
        self.image_input, self.f_ids = image_input, f_ids  # F's pixels of some images; all captions as F reads them

    def __getattr__(self, name):  # device, fusion, lists: the wrapped teachers'
        return getattr(self.teachers, name)

    @property
    def feed_images(self) -> list:
        return self.teachers.feed_images

    def __call__(self, batch: list, ids, idx: np.ndarray, cap: np.ndarray) -> TeacherOutputs:
        from dataclasses import replace

        out = self.teachers(batch, ids, idx, cap)
        h_img, h_txt = online_candidate_features(self.teachers.fusion, self.image_input, self.f_ids,
                                                 self.cap_table, self.teachers.lists, idx, cap, self.tau_f)
        return replace(out, h_img=h_img.to(out.v.device), h_txt=h_txt.to(out.v.device))


class _Head:
    """The first `n` images of each step's batch (the adapters' batches; picklable for the loader)."""

    def __init__(self, batches, n: int):
        self.batches, self.n = batches, n

    def __call__(self, step: int) -> np.ndarray:
        return self.batches(step)[:self.n]


def fit_adapters(cfg, teachers, h_dim: int, dim: int, n_images: int, ids, caps, batches, seed,
                 progress=True) -> FusionAdapters:
    """A_img/A_txt such that ṽ_i·t_j over each row's candidates follows F's ITM judgement (and
    symmetrically)."""
    torch.manual_seed(seed + 5)
    ad = FusionAdapters(h_dim, dim).to(teachers.device)
    acfg = {"steps": int(cfg["adapters"]["steps"]), "lr": float(cfg["adapters"]["lr"]), "warmup": 10, "weight_decay": 0.0}
    tr = Trainer({"adapters": ad}, acfg, desc="fusion adapters")
    bs, tau, tau_f = int(cfg["adapters"]["batch_size"]), float(cfg["adapters"]["tau"]), float(cfg["loss"]["tau_f"])
    head = _Head(batches, bs)
    feed = StepFeed(teachers.feed_images, head, acfg["steps"])

    def loss_fn(step):
        idx = head(step)
        cap = caption_choice(n_images, caps, seed, step, idx)
        tb = teachers(feed(step), ids, idx, cap)
        v_m, t_m = modified_features(ad, tb, 1.0, str(cfg["loss"].get("fused", "matched")))
        s_half_i = (v_m @ tb.t.T).masked_fill(~tb.mask_i2t, NEG)   # only the image side modified
        s_half_t = (t_m @ tb.v.T).masked_fill(~tb.mask_t2i, NEG)   # only the text side modified
        loss = 0.5 * (kl_rows((tb.m_i2t / tau_f * tau).masked_fill(~tb.mask_i2t, NEG), s_half_i, tau) +
                      kl_rows((tb.m_t2i / tau_f * tau).masked_fill(~tb.mask_t2i, NEG), s_half_t, tau))
        return loss, {}

    tr.fit(loss_fn, progress=progress)
    ad.requires_grad_(False)
    return ad
