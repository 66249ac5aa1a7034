"""What the fusion teacher can add over the dual teacher on the training candidate lists, from the
teacher cache: how often each teacher ranks the positive first among an image's candidates, how
far apart D's scores are, and how much probability each MCAD form (`loss.within`) moves to the
positive against D's own row (docs/method.md, "Teacher similarity distribution, modified").

  python benchmarks/studies/candidates.py [cache=runs/teachers/cache] [tau_kd=0.05] [tau_f=1.0]
         [out=benchmarks/results]

Each image's row is its candidate list L_i (itself + its neighbours under D), scored on the first
caption of each candidate image: D by cosine v_i·t, F by the cached ITM logit.
"""
from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import torch

from mcad.distill.cache import TeacherCache
from mcad.distill.losses import reassign_by_order, split_by_fusion
from mcad.config import parse_overrides
from mcad.io import atomic_write_text, machine, now_iso, write_json

log = logging.getLogger(__name__)


def candidate_stats(s_dual: torch.Tensor, m: torch.Tensor, tau_kd: float, tau_f: float) -> dict:
    """s_dual, m: [N, k] scores of each row's candidates, the positive in column 0."""
    mask = torch.ones_like(s_dual, dtype=torch.bool)
    spread = s_dual.max(1).values - s_dual.min(1).values
    p_dual = torch.softmax(s_dual / tau_kd, 1)
    forms = {"order": reassign_by_order(s_dual, m, mask),
             "split": split_by_fusion(s_dual, mask, m, tau_kd, tau_f)}
    out = {"rows": int(s_dual.shape[0]), "candidates": int(s_dual.shape[1]),
           "dual_positive_first": float((s_dual.argmax(1) == 0).float().mean()),
           "fusion_positive_first": float((m.argmax(1) == 0).float().mean()),
           "dual_spread_median": float(spread.median()),
           "dual_spread_median_tau_kd": float(spread.median() / tau_kd),
           "mass_on_positive": {"dual": float(p_dual[:, 0].mean())}, "kl_to_dual": {}}
    for name, s in forms.items():
        q = torch.softmax(s / tau_kd, 1)
        out["mass_on_positive"][name] = float(q[:, 0].mean())
        out["kl_to_dual"][name] = float((q * (q.log() - p_dual.log())).sum(1).mean())
    return out


def cache_rows(cache: TeacherCache) -> tuple[torch.Tensor, torch.Tensor]:
    """(D's cosine, F's ITM logit) of each image against the first caption of each candidate."""
    lists = torch.as_tensor(cache.lists).long()
    s = torch.einsum("nd,nkd->nk", cache.v, cache.t[lists, 0])
    return s, cache.m_i2t[:, :, 0]


def markdown(stats: dict, meta: dict) -> str:
    mp, kl = stats["mass_on_positive"], stats["kl_to_dual"]
    return "\n".join([
        "# Candidate lists: what the fusion teacher can add", "",
        f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ", f"Machine: {meta['machine']}  ",
        f"Cache: `{meta['cache']}` ({stats['rows']} images, {stats['candidates']} candidates each, "
        f"τ_kd = {meta['tau_kd']}, τ_F = {meta['tau_f']})", "",
        "| measure | value |", "|---|---:|",
        f"| D ranks the positive first | {100 * stats['dual_positive_first']:.1f}% |",
        f"| F ranks the positive first | {100 * stats['fusion_positive_first']:.1f}% |",
        f"| D's score spread over a row, median (cosine) | {stats['dual_spread_median']:.4f} "
        f"({stats['dual_spread_median_tau_kd']:.2f} τ_kd) |",
        f"| mass on the positive: D | {mp['dual']:.3f} |",
        f"| mass on the positive: MCAD order | {mp['order']:.3f} (KL to D {kl['order']:.4f}) |",
        f"| mass on the positive: MCAD split | {mp['split']:.3f} (KL to D {kl['split']:.4f}) |", ""])


OPTIONS = {"cache": "runs/teachers/cache", "tau_kd": 0.05, "tau_f": 1.0, "out": "benchmarks/results"}


def main(argv: list[str]) -> int:
    args = parse_overrides(argv, OPTIONS).config
    cache_dir = args["cache"]
    tau_kd, tau_f = args["tau_kd"], args["tau_f"]
    out = Path(args["out"])
    stats = candidate_stats(*cache_rows(TeacherCache(cache_dir)), tau_kd, tau_f)
    meta = {"command": " ".join(["python benchmarks/studies/candidates.py", *map(shlex.quote, argv)]).strip(),
            "date": now_iso(), "machine": machine(), "cache": cache_dir, "tau_kd": tau_kd, "tau_f": tau_f}
    write_json(out / "candidates.json", {"meta": meta, "stats": stats})
    text = markdown(stats, meta)
    atomic_write_text(out / "candidates.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
