"""`mcad cache` under torchrun (2 gloo processes) writes the cache one process writes: the same shard
files and unpaired tables byte for byte, the same manifests but for their time fields, and a build
killed part-way resumes from its partial.json under the other process count."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SHARD = 8  # the val split's 40 images: 5 shards; 30 unpaired images: 4 chunks of F's pairs
VOLATILE = {"created", "seconds"}  # the manifest's clock fields: when, and how long, a build took


@pytest.fixture(scope="module")
def sources(synth_root, tmp_path_factory):
    """30 photos (the test split's first images) and 50 queries (captions of its later images)."""
    from mcad.data.karpathy import load_karpathy

    root = tmp_path_factory.mktemp("sharded-sources")
    photos = root / "photos"
    photos.mkdir()
    test = load_karpathy(synth_root / "dataset_synth.json", split="test")
    for n, src in enumerate(test.image_paths[:30]):
        shutil.copy(src, photos / f"p{n:03d}.png")
    queries = root / "queries.txt"
    texts = [c for c, i in zip(test.captions, test.caption_to_image) if i >= 30][:50]
    queries.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return photos, queries


def _cache(nproc: int, out: Path, args: list[str]) -> str:
    """Run `mcad cache` into `out` with `nproc` processes (one thread each); its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "mcad.cli"] if nproc == 1 else \
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", f"--nproc_per_node={nproc}", "-m", "mcad.cli"]
    done = subprocess.run([*launch, "cache", f"cache={out}", f"threads={nproc}", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def _files(root: Path) -> dict[str, bytes]:
    """Every file the cache holds (not its lock or log), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in (".lock", "cache.log")}


def _manifest(raw: bytes) -> dict:
    return {k: v for k, v in json.loads(raw).items() if k not in VOLATILE}


def _assert_same_cache(one: Path, two: Path) -> None:
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b)
    assert sum(n.endswith(".safetensors") for n in a) == 40 // SHARD + 1  # the shards and the unpaired tables
    for name in a:
        if name.endswith("manifest.json"):
            assert _manifest(a[name]) == _manifest(b[name]), name
        else:
            assert a[name] == b[name], f"{name} differs"


@pytest.mark.slow
def test_two_processes_write_the_one_process_cache(teachers, synth_root, sources, tmp_path):
    photos, queries = sources
    args = [f"data={synth_root}", f"teachers={teachers}", "train_split=val", f"cache_shard_images={SHARD}",
            "loss.lam=0.5", f"unpaired.images={photos}", f"unpaired.texts={queries}", "unpaired.k=3"]
    _cache(1, tmp_path / "one", args)
    log = _cache(2, tmp_path / "two", args)
    assert "process 0 of 2 wrote 3 of 5 shards" in log and "process 1 of 2 wrote 2 of 5 shards" in log
    _assert_same_cache(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "one" / "manifest.json").read_text())["fused_features"]

    # a one-process build killed after 2 shards (partial.json records them), resumed by two processes
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "one", killed)
    manifest = json.loads((killed / "manifest.json").read_text())
    (killed / "manifest.json").unlink()
    shutil.rmtree(killed / "unpaired")
    for sh in manifest["shards"][2:]:
        (killed / sh["file"]).unlink()
    (killed / "partial.json").write_text(json.dumps({"key": manifest["build_key"], "shards": [
        {**sh, "pairs": _pairs(killed / sh["file"])} for sh in manifest["shards"][:2]]}))
    log = _cache(2, killed, args)
    assert "resuming after 2 of 5 shards" in (killed / "cache.log").read_text()
    assert "process 1 of 2 wrote 1 of 5 shards" in log
    _assert_same_cache(tmp_path / "one", killed)


def _pairs(shard: Path) -> int:
    """The fusion pairs a shard holds logits of (as build_cache counts them: m_t2i's r = 0 is m_i2t's)."""
    from safetensors.torch import load_file

    d = load_file(str(shard))
    return int((~d["m_i2t"].isnan()).sum() + (~d["m_t2i"][:, :, 1:].isnan()).sum())


def test_unpaired_batches_that_cannot_split_over_the_processes_are_one_line():
    """Each process encodes its slice of every unpaired batch: a batch of all 15 images (fewer than
    batch_size) cannot split over 2 processes, and the run says so before any work."""
    from mcad.distill.unpaired import UnpairedBatches, check_split

    few = UnpairedBatches(np.zeros((15, 2), dtype=np.int64), np.zeros((40, 2), dtype=np.int64), 16, seed=0)
    with pytest.raises(ValueError, match=r"^unpaired: batches of 15 images and 16 texts \(batch_size=16 or all there "
                                         r"are\) do not split over 2 processes: give batch_size a multiple of 2 of at "
                                         r"most 14$"):
        check_split(few, 16, 2)
    check_split(few, 16, 1)  # one process takes any batch
    check_split(UnpairedBatches(np.zeros((30, 2), dtype=np.int64), np.zeros((40, 2), dtype=np.int64), 16, 0), 16, 2)
    assert [len(x) for x in few(0)] == [15, 16]


def test_a_second_cache_into_the_same_folder_is_refused(synth_root, tmp_path, capsys):
    """One writer per cache folder (under torchrun rank 0 holds it): refused in one line before any
    teacher is looked for (there are none here: a build that got further fails on them)."""
    from cli_helpers import held_lock, run_cli

    out = tmp_path / "cache"
    with held_lock(out, "cache") as holder:
        code, err, _ = run_cli(["cache", f"data={synth_root}", f"teachers={tmp_path / 'no-teachers'}", f"cache={out}"],
                               capsys)
    assert code == 1 and err == [f"mcad cache: error: {out}: mcad cache (pid {holder.pid}) is writing this folder; "
                                 f"wait for it to end or give another folder (one writer per folder)"], err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
