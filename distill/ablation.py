"""`make ablation`: the four variants of docs/method.md with identical budgets, seeds, batch order
and student initialisation; mean ± std per variant and the paired per-seed RSUM differences."""
from __future__ import annotations

import copy
import json
import logging
import math
import sys
from pathlib import Path

import numpy as np

from mcad.config import load_command_config
from mcad.distill.recipe import UNUSED, VARIANTS, comparable, distill
from mcad.paths import RESULTS_DIR
from mcad.io import machine, now_iso, write_json

log = logging.getLogger("mcad.ablation")
COLS = ["i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum"]
PAIRS = [("mcad", "dual"), ("dual", "none"), ("mcad", "none"), ("single", "none"),
         ("mcad", "mcad-lam0"), ("mcad-lam0", "dual")]
# named variants beside the recipe's four: a variant with settings of its own, in the same table
# (issue 15: MCAD with λ > 0 against MCAD without the modified features)
SETTINGS = {"mcad-lam0": ("mcad", {"loss": {"lam": 0.0}})}
# the ablation's own keys, beside the student recipe's (which every run gets)
OWN = {"seeds": "0,1,2,3,4", "variants": ",".join(VARIANTS), "results": str(RESULTS_DIR)}



def _recipe(cfg: dict) -> dict:
    """The part of a run's config that decides its result: not which ablation asked for it or where
    it was written, and
    not the loss settings its variant does not use (changing λ does not retrain the no-KD runs)."""
    out = {k: v for k, v in comparable(cfg).items() if k not in ("seeds", "variants", "results", "out")}
    for key in UNUSED.get(cfg.get("variant"), ()):
        top, _, sub = key.partition(".")
        if sub and isinstance(out.get(top), dict):
            out[top].pop(sub, None)
        elif not sub:
            out.pop(top, None)
    return out


def summarize(results: dict[str, dict[int, dict]]) -> dict:
    out = {"variants": {}, "paired": {}}
    for v, per_seed in results.items():
        out["variants"][v] = {c: {"mean": float(np.mean([r[c] for r in per_seed.values()])),
                                  "std": float(np.std([r[c] for r in per_seed.values()], ddof=1)) if len(per_seed) > 1 else 0.0}
                              for c in COLS}
    for a, b in PAIRS:
        if a in results and b in results:
            out["paired"][f"{a} - {b}"] = paired(results[a], results[b], lambda r: r["rsum"])
            # R@1: the mean of both directions, reported beside RSUM (which the decision reads)
            out.setdefault("paired_r1", {})[f"{a} - {b}"] = paired(
                results[a], results[b], lambda r: 0.5 * (r["i2t_r1"] + r["t2i_r1"]))
    return out


def paired(a: dict[int, dict], b: dict[int, dict], metric) -> dict:
    """Per-seed differences a - b of `metric` over the seeds both have; mean, standard error, and
    whether the mean exceeds twice it."""
    seeds = sorted(set(a) & set(b))
    d = np.array([metric(a[s]) - metric(b[s]) for s in seeds])
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"per_seed": dict(zip(map(str, seeds), d.tolist())), "mean": float(d.mean()),
            "stderr": se, "above_2se": bool(len(d) > 1 and d.mean() > 2 * se),
            "below_2se": bool(len(d) > 1 and d.mean() < -2 * se)}


def verdict(p: dict) -> str:
    """The declared rule on one pair a - b: a beats b when the mean difference exceeds twice its
    standard error, loses when it is below minus twice it, and ties otherwise."""
    m, se = p["mean"], p["stderr"]
    if not se == se:  # one seed: no standard error, no verdict
        return "-"
    return "> +2 SE (a wins)" if m > 2 * se else "< -2 SE (a loses)" if m < -2 * se else "within ±2 SE (tie)"


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"# Ablation (test split, mean ± std over seeds {meta['seeds']})", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ", f"Machine: {meta['machine']}", "",
             "| variant | " + " | ".join(c.replace("_r", " R@") for c in COLS) + " |", "|---|" + "---:|" * len(COLS)]
    for v, row in summary["variants"].items():
        lines.append(f"| {v} | " + " | ".join(f"{row[c]['mean']:.1f} ± {row[c]['std']:.1f}" for c in COLS) + " |")
    lines += ["", "Paired RSUM differences (same seed, same batches, same initialisation):", "",
              "| pair (a - b) | per seed | mean | std. error | mean vs 2 SE |", "|---|---|---:|---:|---|"]
    for name, p in summary["paired"].items():
        ps = ", ".join(f"{s}: {d:+.1f}" for s, d in p["per_seed"].items())
        lines.append(f"| {name} | {ps} | {p['mean']:+.1f} | {p['stderr']:.1f} | {verdict(p)} |")
    if summary.get("paired_r1"):
        lines += ["", "Paired R@1 differences (mean of image->text and text->image R@1):", "",
                  "| pair (a - b) | per seed | mean | std. error | mean vs 2 SE |", "|---|---|---:|---:|---|"]
        for name, p in summary["paired_r1"].items():
            ps = ", ".join(f"{s}: {d:+.1f}" for s, d in p["per_seed"].items())
            lines.append(f"| {name} | {ps} | {p['mean']:+.1f} | {p['stderr']:.1f} | {verdict(p)} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    vs = list(summary["variants"])
    x = np.arange(len(vs))
    for off, col in ((-0.2, "i2t_r1"), (0.2, "t2i_r1")):
        ax.bar(x + off, [summary["variants"][v][col]["mean"] for v in vs], 0.4,
               yerr=[summary["variants"][v][col]["std"] for v in vs], label=col.replace("_r", " R@"), capsize=3)
    ax.set_xticks(x, vs)
    ax.set_ylabel("R@1 (%)")
    ax.set_title("Student R@1 per distillation variant")
    ax.legend()
    fig.tight_layout()
    from mcad.io import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    from mcad.teacher_spec import shorthands

    base = load_command_config(argv, "student", extra=OWN, shorthands=shorthands())
    own = {k: base.pop(k) for k in OWN}  # not part of any run's recipe
    try:
        seeds = [int(s) for s in own["seeds"].split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"seeds: expected comma-separated ints, got {own['seeds']!r}") from None
    variants = [v.strip() for v in own["variants"].split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS and v not in SETTINGS]
    if bad or not variants:
        raise ValueError(f"variants: expected some of {', '.join((*VARIANTS, *SETTINGS))}, got {own['variants']!r}")
    results_dir = Path(own["results"])

    results: dict[str, dict[int, dict]] = {v: {} for v in variants}
    for seed in seeds:
        for v in variants:
            cfg = copy.deepcopy(base)
            recipe_variant, settings = SETTINGS.get(v, (v, {}))
            cfg.update(variant=recipe_variant, seed=seed, name=f"ablation/{v}-s{seed}")
            for section, values in settings.items():
                cfg[section].update(values)
            done = Path(cfg["out"]) / cfg["name"] / "metrics.json"
            if done.exists():  # a finished run of the same recipe is not trained again (resume)
                prev = json.loads(done.read_text())
                if _recipe(prev.get("config", {})) == _recipe(json.loads(json.dumps(cfg))):
                    log.info("ablation: %s seed %d already done (%s)", v, seed, done)
                    results[v][seed] = prev["test"]["student"]
                    continue
                # another recipe ran here: start over rather than resume from its checkpoint
                log.info("ablation: %s was made with another recipe: retraining", done.parent)
                done.unlink()
                (done.parent / "student.ckpt.pt").unlink(missing_ok=True)
            results[v][seed] = distill(cfg)["test"]["student"]
    summary = summarize(results)
    meta = {"command": "mcad ablation " + " ".join(argv), "date": now_iso(), "machine": machine(), "seeds": seeds,
            "steps": base["steps"], "model": base["model"]}
    write_json(results_dir / "ablation.json", {"meta": meta, "results": results, "summary": summary})
    (results_dir / "ablation.md").write_text(markdown(summary, meta))
    plot(summary, results_dir / "ablation.png")
    print(markdown(summary, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
