"""The embedded benchmark: two-object scenes where *binding* decides retrieval.

Every image holds two objects (colour x shape) in a spatial relation. Captions of different images
differ by which colour goes with which shape or by the relation, so a bag-of-words text encoder
cannot tell them apart and a cross-attention model can. Perception is made easy on purpose
(64 px images, objects >= 16 px, 8 well separated colours, 5 distinct shapes), so that what is left
to get wrong is binding.

Test and val are built from confuser groups of four: a scene, its relation swap, its colour swap
and both; every test image has a description of its own, so each caption has exactly one right
image and the ceiling is R@1 = 100 in both directions (`ceiling_check` proves it on the files).
The output is the Karpathy JSON format, so the real loader reads it.
"""
from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mcad.io import atomic_write_bytes, write_json

log = logging.getLogger("mcad.data")

COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 235), "yellow": (240, 220, 40),
    "purple": (150, 60, 210), "orange": (250, 140, 20), "cyan": (40, 210, 220), "white": (245, 245, 245),
}
SHAPES = ["circle", "square", "triangle", "cross", "diamond"]
SHAPE_WORDS = {"circle": ["circle", "disc"], "square": ["square", "box"], "triangle": ["triangle"],
               "cross": ["cross", "plus sign"], "diamond": ["diamond", "rhombus"]}
# Relation of the first-named object to the second. Canonical scenes store (first, second, axis)
# with first = left (axis "h") or top (axis "v").
REL_WORDS = {
    "left": ["left of", "to the left of", "on the left of"],
    "right": ["right of", "to the right of", "on the right of"],
    "above": ["above", "over", "on top of"],
    "below": ["below", "under", "beneath"],
}
TEMPLATES = [
    "a {a} {rel} a {b}",
    "there is a {a} {rel} a {b}",
    "the {a} is {rel} the {b}",
    "{a} {rel} {b}",
    "a photo of a {a} {rel} a {b}",
    "an image with a {a} placed {rel} a {b}",
    "a picture showing a {a} {rel} a {b}",
]


@dataclass(frozen=True)
class Scene:
    c1: str
    s1: str
    c2: str
    s2: str
    axis: str  # "h": object 1 left of object 2; "v": object 1 above object 2

    @property
    def key(self) -> str:
        return f"{self.c1} {self.s1} | {self.c2} {self.s2} | {self.axis}"

    def relation_swap(self) -> "Scene":
        return Scene(self.c2, self.s2, self.c1, self.s1, self.axis)

    def colour_swap(self) -> "Scene":
        return Scene(self.c2, self.s1, self.c1, self.s2, self.axis)


def all_scenes() -> list[Scene]:
    objs = [(c, s) for c in COLOURS for s in SHAPES]
    return [Scene(a[0], a[1], b[0], b[1], ax) for a in objs for b in objs if a != b for ax in ("h", "v")]


def captions_for(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """n distinct captions; each names both colours, both shapes and the relation, so it fits one scene."""
    out: list[str] = []
    tries = 0
    while len(out) < n and tries < 200:
        tries += 1
        flip = rng.random() < 0.5  # name the second object first, with the inverse relation
        if scene.axis == "h":
            rel = "right" if flip else "left"
        else:
            rel = "below" if flip else "above"
        first, second = ((scene.c2, scene.s2), (scene.c1, scene.s1)) if flip else ((scene.c1, scene.s1), (scene.c2, scene.s2))
        a = f"{first[0]} {rng.choice(SHAPE_WORDS[first[1]])}"
        b = f"{second[0]} {rng.choice(SHAPE_WORDS[second[1]])}"
        cap = rng.choice(TEMPLATES).format(a=a, b=b, rel=rng.choice(REL_WORDS[rel]))
        if cap not in out:
            out.append(cap)
    return out


def parse_caption(caption: str) -> Scene:
    """Inverse of `captions_for`: the scene a caption describes (used to prove the ceiling)."""
    words = caption
    rel_found = None
    for rel, phrases in REL_WORDS.items():
        for ph in sorted(phrases, key=len, reverse=True):
            if f" {ph} " in f" {words} ":
                rel_found = (rel, ph)
                break
        if rel_found:
            break
    if rel_found is None:
        raise ValueError(f"no relation in caption {caption!r}")
    left, right = f" {words} ".split(f" {rel_found[1]} ", 1)

    def obj(text: str) -> tuple[str, str]:
        colour = [c for c in COLOURS if f" {c} " in f" {text} "]
        shape = [s for s, ws in SHAPE_WORDS.items() if any(f" {w} " in f" {text} " for w in ws)]
        if len(colour) != 1 or len(shape) != 1:
            raise ValueError(f"ambiguous object {text!r} in caption {caption!r}")
        return colour[0], shape[0]

    a, b = obj(left), obj(right)
    rel = rel_found[0]
    if rel in ("left", "above"):
        return Scene(a[0], a[1], b[0], b[1], "h" if rel == "left" else "v")
    return Scene(b[0], b[1], a[0], a[1], "h" if rel == "right" else "v")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        q = r * 0.88
        draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)
    elif shape == "cross":
        t = r * 0.36
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(shape)


def render(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    nrng = np.random.default_rng(rng.getrandbits(32))
    bg = tuple(int(v) for v in nrng.integers(20, 70, size=3))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    r1, r2 = (rng.uniform(0.13, 0.165) * size for _ in range(2))
    m = 0.2 * size  # margin so shapes stay whole
    # Along the relation axis the two objects are clearly apart; across it they may shift a little.
    along1 = rng.uniform(m, 0.37 * size)
    along2 = rng.uniform(0.63 * size, size - m)
    across1 = rng.uniform(0.3 * size, 0.7 * size)
    across2 = min(max(across1 + rng.uniform(-0.15, 0.15) * size, m), size - m)
    p1, p2 = ((along1, across1), (along2, across2)) if scene.axis == "h" else ((across1, along1), (across2, along2))
    for (c, s), (x, y), r in (((scene.c1, scene.s1), p1, r1), ((scene.c2, scene.s2), p2, r2)):
        base = np.array(COLOURS[c]) + nrng.integers(-12, 13, size=3)
        _draw_shape(draw, s, x, y, r, tuple(int(v) for v in np.clip(base, 0, 255)))
    arr = np.asarray(im, dtype=np.int16) + nrng.normal(0, 4, size=(size, size, 3)).round().astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def confuser_groups(n_groups: int, rng: random.Random, exclude: set[str]) -> list[list[Scene]]:
    """Groups of 4 mutually confusable scenes with descriptions unused so far."""
    candidates = [s for s in all_scenes() if s.c1 != s.c2 and s.s1 != s.s2]
    rng.shuffle(candidates)
    groups: list[list[Scene]] = []
    if n_groups <= 0:
        return groups
    used = set(exclude)
    for base in candidates:
        g = [base, base.relation_swap(), base.colour_swap(), base.colour_swap().relation_swap()]
        if any(s.key in used for s in g):
            continue
        used.update(s.key for s in g)
        groups.append(g)
        if len(groups) == n_groups:
            return groups
    raise ValueError(f"only {len(groups)} disjoint confuser groups available, {n_groups} asked")


def generate(out_dir: str | Path, seed: int = 0, n_train: int = 20000, n_val: int = 500,
             n_test: int = 1000, image_size: int = 64, captions_per_image: int = 5,
             train_confuser_share: float = 0.5, progress: bool = True) -> Path:
    """Write images/ and dataset_synth.json (Karpathy format) under out_dir; returns the JSON path.

    Deterministic by seed. Test and val images have unique descriptions, in confuser groups of 4;
    train mixes confuser groups (so confusers co-occur) with random scenes."""
    from mcad.checks import DATA, integer

    given = {"seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": image_size,
             "captions_per_image": captions_per_image}
    for key, value in given.items():  # "wrote -4 images" is not a data set
        integer(value, key, DATA[key])
    if n_train + n_val + n_test == 0:
        raise ValueError("n_train=0, n_val=0, n_test=0: no images to write (give at least one split a size)")
    if n_test % 4 or n_val % 4:
        raise ValueError(f"n_test={n_test}, n_val={n_val}: must be multiples of 4 (confuser groups)")
    out_dir = Path(out_dir)
    img_dir = out_dir / "images"
    try:
        img_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # out= under a file, or unwritable
        raise ValueError(f"{out_dir}: cannot create the data folder ({e.strerror}); choose another out=") from None
    rng = random.Random(seed)
    test_groups = confuser_groups(n_test // 4, rng, set())
    val_groups = confuser_groups(n_val // 4, rng, {s.key for g in test_groups for s in g})
    plan: list[tuple[str, Scene]] = [("test", s) for g in test_groups for s in g]
    plan += [("val", s) for g in val_groups for s in g]
    scenes = all_scenes()
    n_grouped = int(n_train * train_confuser_share) // 4 * 4
    pool = [s for s in scenes if s.c1 != s.c2 and s.s1 != s.s2]
    while len([p for p in plan if p[0] == "train"]) < n_grouped:
        base = rng.choice(pool)
        plan += [("train", s) for s in (base, base.relation_swap(), base.colour_swap(),
                                         base.colour_swap().relation_swap())]
    plan += [("train", rng.choice(scenes)) for _ in range(n_train - n_grouped)]

    images, sentid = [], 0
    for k, (split, scene) in enumerate(tqdm(plan, desc="synthetic images", unit="img", disable=not progress)):
        fname = f"{split}_{k:06d}.png"
        im = render(scene, rng, image_size)
        import io as _io

        buf = _io.BytesIO()
        im.save(buf, format="PNG", optimize=False)
        atomic_write_bytes(img_dir / fname, buf.getvalue())
        caps = captions_for(scene, rng, captions_per_image)
        images.append({
            "filepath": "", "filename": fname, "imgid": k, "split": split,
            "sentids": list(range(sentid, sentid + len(caps))),
            "sentences": [{"raw": c, "tokens": c.split(), "imgid": k, "sentid": sentid + j}
                          for j, c in enumerate(caps)],
            "scene": {"c1": scene.c1, "s1": scene.s1, "c2": scene.c2, "s2": scene.s2, "axis": scene.axis},
        })
        sentid += len(caps)
    path = out_dir / "dataset_synth.json"
    write_json(path, {"dataset": "synth", "seed": seed, "image_size": image_size, "images": images})
    log.info("wrote %d images (%d train, %d val, %d test) to %s", len(images), n_train, n_val, n_test, out_dir)
    return path


def ceiling_check(json_path: str | Path, split: str = "test") -> dict:
    """Prove the benchmark's ceiling on the written files: every caption of the split parses to its
    own image's scene and no two images of the split share a scene, so each caption has exactly
    one right image and R@1 = 100 is reachable in both directions."""
    data = json.loads(Path(json_path).read_text())
    imgs = [e for e in data["images"] if e["split"] == split]
    keys = [Scene(**e["scene"]).key for e in imgs]
    if len(set(keys)) != len(keys):
        raise AssertionError(f"{json_path}: {len(keys) - len(set(keys))} {split} images share a description")
    wrong = 0
    for e in imgs:
        own = Scene(**e["scene"])
        for s in e["sentences"]:
            if parse_caption(s["raw"]) != own:
                wrong += 1
    by_key = {k: i for i, k in enumerate(keys)}
    swaps = sum(1 for e in imgs if Scene(**e["scene"]).relation_swap().key in by_key
                and Scene(**e["scene"]).colour_swap().key in by_key)
    return {"split": split, "images": len(imgs), "captions": sum(len(e["sentences"]) for e in imgs),
            "unique_descriptions": len(set(keys)), "captions_not_matching_own_scene": wrong,
            "share_with_both_confusers_present": swaps / max(1, len(imgs)),
            "r1_ceiling_t2i": 100.0 if wrong == 0 else None, "r1_ceiling_i2t": 100.0 if wrong == 0 else None}
