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

Optionally (issue 15) a `distill` split with web-like captions: partial (one object named, or the
relation left out) and a stated share wrong (the relation or the colours swapped: a caption of a
confuser), drawn from its own seeded generator after every other split, so train, val and test are
byte-identical with or without it and stay clean. `templates="heldout"` words every caption of every
split with templates the default set never uses (the held-out variant of the benchmark).
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

from mcad.data.spec import synth_json
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
# Held-out wording (issue 15.4): none of these phrasings occurs in TEMPLATES, and none holds a
# colour, shape or relation word, so `parse_caption` still reads every caption.
HELDOUT_TEMPLATES = [
    "in this scene a {a} sits {rel} a {b}",
    "we can see a {a} {rel} a {b}",
    "a drawing where a {a} is {rel} a {b}",
    "one {a} {rel} one {b}",
    "look, a {a} {rel} a {b}",
    "a {a} is shown {rel} a {b}",
    "a rendering of a {a} {rel} a {b}",
]
# Web-like partial captions: one object named ("one"), or both without the relation ("pair").
TEMPLATE_SETS = {
    "default": {"full": TEMPLATES,
                "one": ["a {a}", "there is a {a}", "a photo of a {a}", "an image with a {a}"],
                "pair": ["a {a} and a {b}", "there is a {a} and a {b}", "a photo of a {a} and a {b}", "{a} and {b}"]},
    "heldout": {"full": HELDOUT_TEMPLATES,
                "one": ["we can see a {a}", "in this scene a {a}", "a drawing of a {a}", "look, one {a}"],
                "pair": ["we can see a {a} and a {b}", "in this scene a {a} with a {b}", "one {a}, one {b}",
                         "a rendering of a {a} next to a {b}"]},
}
# what a distillation caption is (the `web` field of each of its sentences)
WEB_KINDS = ("clean", "one", "pair", "relation", "colour")


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


def captions_for(scene: Scene, rng: random.Random, n: int = 5, templates: list[str] = TEMPLATES) -> list[str]:
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
        cap = rng.choice(templates).format(a=a, b=b, rel=rng.choice(REL_WORDS[rel]))
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


def mixed_scenes(rng: random.Random, n: int, confuser_share: float) -> list[Scene]:
    """n training scenes: whole confuser groups (so confusers co-occur) for `confuser_share` of
    them, random scenes for the rest."""
    scenes = all_scenes()
    pool = [s for s in scenes if s.c1 != s.c2 and s.s1 != s.s2]
    n_grouped = int(n * confuser_share) // 4 * 4
    out: list[Scene] = []
    while len(out) < n_grouped:
        base = rng.choice(pool)
        out += [base, base.relation_swap(), base.colour_swap(), base.colour_swap().relation_swap()]
    return out + [rng.choice(scenes) for _ in range(n - n_grouped)]


def web_kinds(scenes: list[Scene], per_image: int, partial: float, wrong: float,
              rng: random.Random) -> list[list[str]]:
    """The kind (WEB_KINDS) of each caption of each image: of all len(scenes) * per_image captions,
    exactly round(partial * n) are partial and round(wrong * n) wrong (the stated shares, not
    expected ones), at places the seeded `rng` chooses. A partial caption names one object or
    leaves the relation out (even odds); a wrong one swaps the colours (when the two differ, even
    odds) or the relation."""
    n = len(scenes) * per_image
    n_partial, n_wrong = round(partial * n), round(wrong * n)
    flat = ["partial"] * n_partial + ["wrong"] * n_wrong + ["clean"] * (n - n_partial - n_wrong)
    rng.shuffle(flat)
    out = []
    for i, scene in enumerate(scenes):
        kinds = []
        for kind in flat[i * per_image:(i + 1) * per_image]:
            if kind == "partial":
                kind = rng.choice(("one", "pair"))
            elif kind == "wrong":
                kind = "colour" if scene.c1 != scene.c2 and rng.random() < 0.5 else "relation"
            kinds.append(kind)
        out.append(kinds)
    return out


def _object_words(colour: str, shape: str, rng: random.Random) -> str:
    return f"{colour} {rng.choice(SHAPE_WORDS[shape])}"


def web_caption(scene: Scene, kind: str, rng: random.Random, templates: dict = TEMPLATE_SETS["default"]) -> str:
    """One caption of `kind` for an image of `scene`. A wrong caption is a full caption of the
    scene's relation swap or colour swap: the binding error a bag-of-words model cannot see."""
    full = templates["full"]
    if kind == "clean":
        return captions_for(scene, rng, 1, full)[0]
    if kind == "relation":
        return captions_for(scene.relation_swap(), rng, 1, full)[0]
    if kind == "colour":
        return captions_for(scene.colour_swap(), rng, 1, full)[0]
    objs = [(scene.c1, scene.s1), (scene.c2, scene.s2)]
    if kind == "one":
        c, s = rng.choice(objs)
        return rng.choice(templates["one"]).format(a=_object_words(c, s, rng))
    if kind == "pair":  # both objects, no relation: either may be named first
        if rng.random() < 0.5:
            objs.reverse()
        (c1, s1), (c2, s2) = objs
        return rng.choice(templates["pair"]).format(a=_object_words(c1, s1, rng), b=_object_words(c2, s2, rng))
    raise ValueError(f"caption kind {kind!r}: expected one of {', '.join(WEB_KINDS)}")


def web_captions(scene: Scene, kinds: list[str], rng: random.Random, templates: dict) -> list[str]:
    """One caption per kind, distinct where a few draws allow (a one-object caption has few
    wordings; a repeat is kept then, as web data has them)."""
    out: list[str] = []
    for kind in kinds:
        for _ in range(50):
            cap = web_caption(scene, kind, rng, templates)
            if cap not in out:
                break
        out.append(cap)
    return out


def _check_options(n_distill: int, web_partial: float, web_wrong: float, templates: str) -> None:
    if templates not in TEMPLATE_SETS:
        raise ValueError(f"templates={templates!r}: expected one of {', '.join(TEMPLATE_SETS)}")
    for key, share in (("web_partial", web_partial), ("web_wrong", web_wrong)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{key}={share!r}: must be a share in [0, 1]")
    if web_partial + web_wrong > 1.0:
        raise ValueError(f"web_partial={web_partial} + web_wrong={web_wrong}: more than all captions")
    if (web_partial or web_wrong) and not n_distill:
        raise ValueError("web_partial / web_wrong apply to the distillation split: give n_distill > 0")


def _write_image(img_dir: Path, k: int, split: str, scene: Scene, rng: random.Random, image_size: int) -> str:
    import io as _io

    fname = f"{split}_{k:06d}.png"
    buf = _io.BytesIO()
    render(scene, rng, image_size).save(buf, format="PNG", optimize=False)
    atomic_write_bytes(img_dir / fname, buf.getvalue())
    return fname


def _entry(k: int, split: str, fname: str, scene: Scene, caps: list[str], sentid: int,
           kinds: list[str] | None = None) -> dict:
    sentences = [{"raw": c, "tokens": c.split(), "imgid": k, "sentid": sentid + j} for j, c in enumerate(caps)]
    for s, kind in zip(sentences, kinds or []):
        s["web"] = kind  # what the caption is, for checks and analysis (loaders ignore it)
    return {"filepath": "", "filename": fname, "imgid": k, "split": split,
            "sentids": list(range(sentid, sentid + len(caps))), "sentences": sentences,
            "scene": {"c1": scene.c1, "s1": scene.s1, "c2": scene.c2, "s2": scene.s2, "axis": scene.axis}}


def generate(out_dir: str | Path, seed: int = 0, n_train: int = 20000, n_val: int = 500,
             n_test: int = 1000, image_size: int = 64, captions_per_image: int = 5,
             train_confuser_share: float = 0.5, progress: bool = True, n_distill: int = 0,
             distill_captions: int = 5, web_partial: float = 0.0, web_wrong: float = 0.0,
             templates: str = "default") -> Path:
    """Write images/ and dataset_synth.json (Karpathy format) under out_dir; returns the JSON path.

    Deterministic by seed. Test and val images have unique descriptions, in confuser groups of 4;
    train mixes confuser groups (so confusers co-occur) with random scenes. `n_distill` > 0 adds a
    `distill` split mixed like train, with `distill_captions` web-like captions per image
    (`web_partial`, `web_wrong`: exact shares, see `web_kinds`), from a generator of its own seeded
    by `seed`, after every other split: with the defaults the output is what it always was."""
    from mcad.checks import DATA, integer

    given = {"seed": seed, "n_train": n_train, "n_val": n_val, "n_test": n_test, "image_size": image_size,
             "captions_per_image": captions_per_image, "n_distill": n_distill, "distill_captions": distill_captions}
    for key, value in given.items():  # "wrote -4 images" is not a data set
        integer(value, key, DATA[key])
    _check_options(n_distill, web_partial, web_wrong, templates)
    if n_train + n_val + n_test + n_distill == 0:
        raise ValueError("n_train=0, n_val=0, n_test=0: no images to write (give at least one split a size)")
    if n_test % 4 or n_val % 4:
        raise ValueError(f"n_test={n_test}, n_val={n_val}: must be multiples of 4 (confuser groups)")
    words = TEMPLATE_SETS[templates]
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
    plan += [("train", s) for s in mixed_scenes(rng, n_train, train_confuser_share)]

    images, sentid = [], 0
    for k, (split, scene) in enumerate(tqdm(plan, desc="synthetic images", unit="img", disable=not progress)):
        fname = _write_image(img_dir, k, split, scene, rng, image_size)
        caps = captions_for(scene, rng, captions_per_image, words["full"])
        images.append(_entry(k, split, fname, scene, caps, sentid))
        sentid += len(caps)
    meta = {"dataset": "synth", "seed": seed, "image_size": image_size}
    if templates != "default":  # recorded only when asked, so the default file is unchanged
        meta["templates"] = templates
    if n_distill:
        # its own generator: the other splits are the same images and captions with or without it
        drng = random.Random(f"mcad-distill-{seed}")
        scenes = mixed_scenes(drng, n_distill, train_confuser_share)
        kinds = web_kinds(scenes, distill_captions, web_partial, web_wrong, drng)
        for j, (scene, kk) in enumerate(tqdm(list(zip(scenes, kinds)), desc="distillation images", unit="img",
                                             disable=not progress)):
            k = len(plan) + j
            fname = _write_image(img_dir, k, "distill", scene, drng, image_size)
            caps = web_captions(scene, kk, drng, words)
            images.append(_entry(k, "distill", fname, scene, caps, sentid, kk))
            sentid += len(caps)
        meta["web"] = {"n_distill": n_distill, "distill_captions": distill_captions,
                       "web_partial": web_partial, "web_wrong": web_wrong}
    path = synth_json(out_dir)
    write_json(path, {**meta, "images": images})
    log.info("wrote %d images (%d train, %d val, %d test, %d distill) to %s", len(images), n_train, n_val,
             n_test, n_distill, out_dir)
    return path


def web_check(json_path: str | Path, split: str = "distill") -> dict:
    """What the distillation captions are, measured on the written files: a caption that parses to
    its own image's scene is clean, to another scene wrong, and one that does not parse (no
    relation, or one object) partial. Checked against the kind each sentence records."""
    data = json.loads(Path(json_path).read_text())
    counts = {"clean": 0, "partial": 0, "wrong": 0}
    mismatched = 0
    for e in (e for e in data["images"] if e["split"] == split):
        own = Scene(**e["scene"])
        for s in e["sentences"]:
            try:
                kind = "clean" if parse_caption(s["raw"]) == own else "wrong"
            except ValueError:
                kind = "partial"
            counts[kind] += 1
            recorded = s.get("web")
            if recorded is not None and {"one": "partial", "pair": "partial", "relation": "wrong",
                                         "colour": "wrong"}.get(recorded, recorded) != kind:
                mismatched += 1
    n = sum(counts.values())
    return {"split": split, "captions": n, **counts,
            "share_partial": counts["partial"] / max(1, n), "share_wrong": counts["wrong"] / max(1, n),
            "kind_not_as_recorded": mismatched}


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
