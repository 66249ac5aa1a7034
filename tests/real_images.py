"""A small real-image caption set for parity checks, built from images that installed packages ship:
matplotlib's sample data (a portrait photograph, two drawings, an MRI slice, two elevation rasters)
and scikit-learn's two sample photographs (scikit-learn comes with executorch). Nothing is
downloaded and no image is committed.

Each image of the set is a seeded crop (position, scale, mirror) of one source; its captions name
the source's subject and the crop's part of it, so a student can learn them. The rasters are
rendered with matplotlib colour maps, one of them a saturated rainbow: dense, saturated drawings
are the inputs that real data brings and the synthetic shapes do not.

  python tests/real_images.py OUT [SIZE]      # writes OUT/dataset_real.json and OUT/images/
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image


def _mpl(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / name


def _sklearn(name: str) -> Path:
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "images" / name


def _photo(path: Path) -> Image.Image:
    im = Image.open(path)
    if im.mode in ("RGBA", "LA", "P"):  # drawings with transparency: on white paper
        im = im.convert("RGBA")
        paper = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(paper, im)
    return im.convert("RGB")


def _raster(values: np.ndarray, cmap: str) -> Image.Image:
    from matplotlib import colormaps

    v = np.asarray(values, np.float64)
    lo, hi = np.percentile(v, [1, 99])
    rgb = colormaps[cmap](np.clip((v - lo) / max(hi - lo, 1e-9), 0, 1))[..., :3]
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def _mri() -> np.ndarray:
    raw = gzip.open(_mpl("s1045.ima.gz")).read()
    return np.frombuffer(raw, np.uint16).reshape(256, 256)


# (key, subject as captions name it, loader); RARE ones get a quarter of the train crops: a kind that
# a calibration draw holds few of, as a real set's odd drawings are
SOURCES = (
    ("hopper", "a portrait photo of a woman in a naval uniform", lambda: _photo(_mpl("grace_hopper.jpg"))),
    ("temple", "a photo of a chinese temple among trees", lambda: _photo(_sklearn("china.jpg"))),
    ("flower", "a photo of an orange dahlia flower", lambda: _photo(_sklearn("flower.jpg"))),
    ("present", "a drawing of a blue gift box with a ribbon", lambda: _photo(_mpl("Minduka_Present_Blue_Pack.png"))),
    ("logo", "a drawing of a colourful logo with blue letters", lambda: _photo(_mpl("logo2.png"))),
    ("mri", "a grey medical scan of a head", lambda: _raster(_mri(), "gray")),
    ("relief", "an earth coloured relief map of hills", lambda: _raster(np.load(_mpl("jacksboro_fault_dem.npz"))["elevation"], "gist_earth")),
    ("rainbow", "a bright rainbow coloured elevation map", lambda: _raster(np.load(_mpl("jacksboro_fault_dem.npz"))["elevation"], "jet")),
    ("coast", "a map of land and sea depth in green and blue", lambda: _raster(np.load(_mpl("topobathy.npz"))["topo"], "terrain")),
    ("bands", "a map drawn in dense bands of saturated colours", lambda: _raster(np.load(_mpl("jacksboro_fault_dem.npz"))["elevation"], "prism")),
    ("flag", "a map striped red white and blue", lambda: _raster(np.load(_mpl("topobathy.npz"))["topo"], "flag")),
)
RARE = ("bands", "flag")
ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")


def _crop(im: Image.Image, rng: np.random.Generator, size: int) -> tuple[Image.Image, str]:
    """A square crop of a seeded scale and place (mirrored half the time), resized to `size`, and the
    words that say which part of the source it shows."""
    w, h = im.size
    side = int(min(w, h) * rng.uniform(0.35, 1.0))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    part = im.crop((x, y, x + side, y + side))
    if rng.random() < 0.5:
        part = part.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    row = ROWS[min(2, int(3 * (y + side / 2) / h))]
    col = COLS[min(2, int(3 * (x + side / 2) / w))]
    where = "the whole picture" if side > 0.8 * min(w, h) else ("the centre" if (row, col) == ("middle", "centre")
                                                                 else f"the {row} {col}")
    zoom = "a wide view" if side > 0.6 * min(w, h) else "a close-up"
    return part.resize((size, size), Image.Resampling.BICUBIC), f"{where}, {zoom}"


def build(root: str | Path, size: int = 96, per_source: int = 24, test_per_source: int = 6, seed: int = 0) -> Path:
    """Write `per_source` train crops (a quarter of it for the RARE sources) and `test_per_source` test
    crops of every source as `size` px JPEG/PNG files under root/images, and their Karpathy JSON (two
    captions each). Deterministic in `seed`. Returns the JSON's path."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries, sent = [], 0
    for key, subject, load in SOURCES:
        im = load()
        n_train = max(1, per_source // 4) if key in RARE else per_source
        for j in range(n_train + test_per_source):
            crop, where = _crop(im, rng, size)
            name = f"{key}_{j:03d}." + ("png" if j % 3 == 0 else "jpg")
            crop.save(root / "images" / name, quality=92)
            caps = [f"{subject}, {where}", f"{where.split(',')[0]} of {subject}"]
            entries.append({"filename": name, "filepath": "", "imgid": len(entries),
                            "split": "train" if j < n_train else "test",
                            "sentences": [{"raw": c, "sentid": sent + i} for i, c in enumerate(caps)]})
            sent += len(caps)
    path = root / "dataset_real.json"
    path.write_text(json.dumps({"dataset": "real", "images": entries}))
    return path


def train_student(json_path: str | Path, run: str | Path, model_name: str = "student-tiny", image_size: int | None = None,
                  steps: int = 150, batch: int = 64, lr: float = 2e-3, seed: int = 0) -> Path:
    """A run folder (student.safetensors, tokenizer.json, manifest.json naming the set as its data)
    with `model_name` trained `steps` CLIP-loss steps on the set's train split: enough for retrieval
    well above chance, in seconds for student-tiny at 64 px. Deterministic in `seed` on one thread."""
    import torch

    from mcad.data.images import load_images, normalize
    from mcad.data.karpathy import load_karpathy
    from mcad.data.spec import DATA_DEFAULTS
    from mcad.models.checkpoint import save_model
    from mcad.models.registry import create_model, with_tokenizer
    from mcad.tokenizer import train_bpe

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    corpus = load_karpathy(json_path, split="train")
    tok = train_bpe(corpus.captions, vocab_size=256, context_length=24)
    torch.manual_seed(seed)
    over = with_tokenizer({"image": {"image_size": image_size}} if image_size else {}, tok)
    model = create_model(model_name, **over)
    px, corpus = load_images(corpus, model.image_size, progress=False)
    pix = normalize(px, model.image_mean, model.image_std)
    ids = torch.as_tensor(tok.encode_batch(corpus.captions))
    c2i = torch.as_tensor(corpus.caption_to_image)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    clip_steps(model, pix, ids, c2i, steps, batch, opt, g, sched)
    save_model(model.eval(), run / "student.safetensors")
    tok.save(run / "tokenizer.json")
    data = {**DATA_DEFAULTS, "format": "karpathy", "json": str(Path(json_path).resolve())}
    (run / "manifest.json").write_text(json.dumps({"kind": "run", "config": {"name": run.name, "data": data}}, indent=1))
    return run


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python tests/real_images.py OUT [SIZE]")
    print(build(sys.argv[1], int(sys.argv[2]) if len(sys.argv) == 3 else 96))


def clip_steps(model, pix, ids, c2i, steps: int, batch: int, opt, g, sched=None):
    """`steps` of the CLIP loss on random caption batches (captions of one image count as one
    target), in train mode; returns the model in eval mode."""
    import torch
    import torch.nn.functional as F

    model.train()
    for _ in range(steps):
        cap = torch.randperm(len(ids), generator=g)[:batch]
        img = c2i[cap]
        u, w, scale = model(pix[img], ids[cap])
        logits = scale * u @ w.T
        same = (img[:, None] == img[None, :]).float()
        tgt = same / same.sum(1, keepdim=True)
        loss = -(tgt * F.log_softmax(logits, 1)).sum(1).mean() - (tgt * F.log_softmax(logits.T, 1)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return model.eval()
