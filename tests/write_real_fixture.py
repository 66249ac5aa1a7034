"""Write the real-path fixture of tests/test_real_path.py to a folder, for running docs/real-data.md
by hand on a clean checkout: tiny random CLIP + BLIP-ITM `save_pretrained` folders under
checkpoints/, and 16 train + 12 test PNG/JPEG files with a Karpathy JSON under data/fixture/.

  python tests/write_real_fixture.py OUT      # then the commands of docs/real-data.md, section 7
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_real_path as t  # noqa: E402  (its helpers: save_clip, save_blip, draw, captions)

N_TEST = 12  # >= 10: the search program's parity needs a gallery of k = 10 test images


def main(root: Path) -> None:
    t.save_clip(root / "checkpoints" / "clip-vit-tiny")
    t.save_blip(root / "checkpoints" / "blip-itm-tiny")
    imgs = root / "data" / "fixture" / "images"
    imgs.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(t.N_TRAIN + N_TEST):
        name = f"{i:03d}." + ("png" if i % 2 else "jpg")
        t.draw(i).save(imgs / name, quality=95)
        entries.append({"filename": name, "filepath": "", "split": "train" if i < t.N_TRAIN else "test", "imgid": i,
                        "sentences": [{"raw": c, "sentid": 2 * i + j} for j, c in enumerate(t.captions(i))]})
    (root / "data" / "fixture" / "dataset_fixture.json").write_text(json.dumps({"dataset": "fixture", "images": entries}))
    print(f"fixture written under {root}: checkpoints/clip-vit-tiny, checkpoints/blip-itm-tiny, data/fixture")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/write_real_fixture.py OUT")
    main(Path(sys.argv[1]))
