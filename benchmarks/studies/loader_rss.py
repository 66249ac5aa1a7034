"""Peak memory of the real path as a data set grows: `mcad cache` and `mcad student` on an n-image
fixture (JPEG photos of mixed aspect, Karpathy JSON) with tiny random CLIP (224 px) and BLIP-ITM
(384 px) teachers, for each n. The loader streams (mcad.data.stream), so the peak should grow with
what the cache holds per image (a few KB), not with the decoded pixels (150 KB per image at 224 px
for CLIP and the student, 442 KB at 384 px for BLIP).

  python benchmarks/studies/loader_rss.py [sizes=2000,8000] [out=build/loader-rss] [results=benchmarks/results]

Each command runs in its own process; its peak resident set is the kernel's ru_maxrss (os.wait4).
Writes loader_rss.{json,md} to `results` (none: only print)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from mcad.config import parse_overrides

OPTIONS = {"sizes": [2000, 8000], "out": "build/loader-rss", "results": "benchmarks/results", "test_images": 100,
           "steps": 20, "batch_size": 32}
CLIP_SIZE, BLIP_SIZE = 224, 384


def write_fixture(root: Path, n_train: int, n_test: int) -> Path:
    """n_train + n_test JPEG photos (smooth random content, 320x240 / 240x320 / 300x300), two captions
    each, as a Karpathy JSON; kept between runs (written once per size)."""
    from PIL import Image

    js = root / "dataset_fixture.json"
    if js.exists():
        return js
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(n_train + n_test):
        size = [(320, 240), (240, 320), (300, 300)][i % 3]
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(root / "images" / f"{i:06d}.jpg", quality=85)
        entries.append({"filename": f"{i:06d}.jpg", "split": "train" if i < n_train else "test",
                        "sentences": [{"raw": f"a photo of a dog number {i}"}, {"raw": f"the cat {i % 97} on a mat"}]})
    tmp = js.with_suffix(".tmp")
    tmp.write_text(json.dumps({"dataset": "fixture", "images": entries}))
    tmp.rename(js)
    return js


def teachers(root: Path) -> tuple[Path, Path]:
    """Tiny random CLIP at 224 px and BLIP-ITM at 384 px (patch 32), as users' folders would be."""
    import shutil

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the suite's tiny-model fixture
    from tiny_hf import save_tiny_blip, save_tiny_clip

    clip, blip = root / "clip-tiny-224", root / "blip-itm-tiny-384"
    if not (clip / "model.safetensors").exists():
        save_tiny_clip(clip, CLIP_SIZE, patch_size=32)
    if not (blip / "model.safetensors").exists():
        shutil.rmtree(save_tiny_blip(blip, image_size=BLIP_SIZE, patch_size=32))
    return clip, blip


COMMANDS = {"cache": "mcad.distill.cache", "student": "mcad.distill.recipe"}  # what `mcad cache|student` run


def measured(argv: list[str], log: Path) -> dict:
    """Run `mcad <argv>` (its module) in a child process: wall time and its peak RSS (MB)."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", COMMANDS[argv[0]], *argv[1:]], stdout=f,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"mcad {' '.join(argv[:2])} exited {code}; see {log}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def run(opts: dict) -> dict:
    out = Path(opts["out"])
    out.mkdir(parents=True, exist_ok=True)
    clip, blip = teachers(out)
    rows = []
    for n in opts["sizes"]:
        data = out / f"data-{n}"
        js = write_fixture(data, int(n), int(opts["test_images"]))
        common = ["flickr30k", f"data.json={js}", f"data.image_root={data / 'images'}", f"dual.path={clip}",
                  f"fusion.path={blip}", f"out={out / f'runs-{n}'}", "threads=1", "device=cpu"]
        cache = measured(["cache", *common, "cache_shard_images=1024"], out / f"cache-{n}.log")
        student = measured(["student", *common, "name=s", f"steps={opts['steps']}", f"batch_size={opts['batch_size']}",
                            "warmup=1", "ckpt_every=0", "adapters.steps=2", "adapters.batch_size=16"],
                           out / f"student-{n}.log")
        rows.append({"images": int(n), "cache": cache, "student": student})
        print(json.dumps(rows[-1]), flush=True)
    return summarize(rows, opts)


def summarize(rows: list[dict], opts: dict) -> dict:
    a, b = rows[0], rows[-1]
    extra = b["images"] - a["images"]
    decoded = {"clip_224_mb": round(extra * 3 * CLIP_SIZE ** 2 / 2 ** 20, 1),
               "blip_384_mb": round(extra * 3 * BLIP_SIZE ** 2 / 2 ** 20, 1)}
    growth = {cmd: round(b[cmd]["peak_rss_mb"] - a[cmd]["peak_rss_mb"], 1) for cmd in ("cache", "student")}
    return {"rows": rows, "extra_images": extra, "growth_mb": growth, "extra_images_decoded": decoded,
            "options": opts}


def markdown(res: dict, meta: dict) -> str:
    lines = ["# Peak memory of the real path as the data set grows (issue 11)", "",
             f"Command: `{meta['command']}`  ", f"Date: {meta['date']}  ", f"Machine: {meta['machine']}", "",
             "Fixture: JPEG photos (320x240, 240x320, 300x300), 2 captions each, Karpathy JSON; tiny random CLIP "
             f"at {CLIP_SIZE} px and BLIP-ITM at {BLIP_SIZE} px (patch 32); `mcad cache flickr30k` and `mcad student "
             f"flickr30k` ({res['options']['steps']} steps, batch {res['options']['batch_size']}, student-mobile at "
             f"{CLIP_SIZE} px), one thread, each in its own process (peak RSS = ru_maxrss).", "",
             "| train images | mcad cache peak RSS MB | wall s | mcad student peak RSS MB | wall s |",
             "|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['images']:,} | {r['cache']['peak_rss_mb']} | {r['cache']['wall_s']} | "
                     f"{r['student']['peak_rss_mb']} | {r['student']['wall_s']} |")
    d, g = res["extra_images_decoded"], res["growth_mb"]
    lines += ["", f"The {res['extra_images']:,} extra images raise the peak by {g['cache']} MB (cache) and "
              f"{g['student']} MB (student). Decoded, they would take {d['clip_224_mb']} MB at {CLIP_SIZE} px "
              f"(what CLIP and the student see) and {d['blip_384_mb']} MB at {BLIP_SIZE} px (BLIP)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from summary import publish

    opts = parse_overrides(list(argv or []), OPTIONS, types={}).config
    publish("benchmarks/studies/loader_rss.py", argv, run(opts), markdown, opts["results"], "loader_rss")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
