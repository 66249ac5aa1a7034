"""The teacher cache gives what running the teachers gives (within float tolerance)."""
from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def cache_setup(teachers, synth_root, tmp_path_factory):
    from mcad.distill.cache import build_cache, candidate_lists, dual_neighbours
    from mcad.evaluate import image_keys
    from mcad.models.checkpoint import load_model
    from mcad.distill.teachers import load_split
    from mcad.tokenizer import Tokenizer

    torch.set_num_threads(1)
    dual, fusion = load_model(teachers / "dual.safetensors"), load_model(teachers / "fusion.safetensors")
    tok = Tokenizer.load(teachers / "tokenizer.json")
    pixels, corpus = load_split(synth_root, "train", dual.image_size)
    ids = tok.encode_batch(corpus.captions)
    keys = image_keys(corpus)
    lists = candidate_lists(dual_neighbours(dual, pixels, 3, keys))
    assert (keys[lists[:, 1:]] != keys[:, None]).all()  # confusers, never another image of the same scene
    assert (keys[candidate_lists(dual_neighbours(dual, pixels, 3))[:, 1:]] == keys[:, None]).any()  # which there are
    out = tmp_path_factory.mktemp("cache")
    # small shards so that the batch draws from several
    build_cache(dual, fusion, pixels, ids, corpus.image_captions(), lists, out, shard_images=50, progress=False)
    return dual, fusion, pixels, ids, corpus, lists, out


def test_cache_matches_online_teachers(cache_setup):
    from mcad.data.images import normalize
    from mcad.distill.cache import TeacherCache, online_batch
    from mcad.distill.sampling import ConfuserBatches, caption_choice

    dual, fusion, pixels, ids, corpus, lists, out = cache_setup
    cache = TeacherCache(out)
    assert len(cache.manifest["shards"]) > 1
    np.testing.assert_array_equal(cache.lists, lists)
    caps = corpus.image_captions()
    batches = ConfuserBatches(cache.neighbours, 32, seed=0, group=4)
    n_cand = 0
    for step in range(3):
        idx = batches(step)
        cap = caption_choice(len(pixels), caps, 0, step, idx)
        on = online_batch(dual, fusion, normalize(pixels[idx], dual.image_mean, dual.image_std),
                          torch.as_tensor(ids[cap]), idx, lists)
        ca = cache.batch(idx, cap)
        assert torch.equal(on.mask, ca.mask)
        assert on.mask.diagonal().all()  # every image's own caption is its candidate
        n_cand += int(on.mask.sum())
        for name in ("v", "t", "h", "m_i2t", "m_t2i"):
            torch.testing.assert_close(getattr(ca, name), getattr(on, name), atol=2e-4, rtol=1e-4, msg=name)
        if step == 0:  # dual KD never reads F: the online path can skip it and keep D's part
            d_only = online_batch(dual, fusion, normalize(pixels[idx], dual.image_mean, dual.image_std),
                                  torch.as_tensor(ids[cap]), idx, lists, with_fusion=False)
            for name in ("v", "t", "mask"):
                assert torch.equal(getattr(d_only, name), getattr(on, name)), name
            assert not d_only.m_i2t.any() and not d_only.h.any()
    assert n_cand > 3 * 32 * 2  # confuser batches put neighbours in: more than the positives alone


def test_cache_refuses_another_data_set_and_missing_shards(cache_setup, tmp_path):
    import shutil

    from mcad.distill.cache import TeacherCache

    _, _, pixels, _, corpus, _, out = cache_setup
    cache = TeacherCache(out)
    with pytest.raises(ValueError, match="another data set"):
        cache.check(len(pixels) - 1, corpus.image_captions()[:-1])
    broken = tmp_path / "c"
    shutil.copytree(out, broken)
    (broken / "shard-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001"):
        TeacherCache(broken)
    with pytest.raises(FileNotFoundError, match="mcad cache"):
        TeacherCache(tmp_path / "none")


def test_student_from_cache_equals_student_with_online_teachers(teachers, synth_root, tmp_path):
    from mcad.distill.cache import main as cache_main
    from mcad.distill.recipe import main
    from mcad.models.checkpoint import load_model

    common = [f"data={synth_root}", f"teachers={teachers}", f"out={tmp_path}", "variant=mcad", "steps=2",
              "batch_size=16", "adapters.steps=2", "adapters.batch_size=8", "threads=1", "warmup=1"]
    assert main([*common, "name=online", f"cache={tmp_path / 'nocache'}"]) == 0
    assert cache_main([f"data={synth_root}", f"teachers={teachers}", f"cache={tmp_path / 'cache'}", "threads=1"]) == 0
    assert main([*common, "name=cached", f"cache={tmp_path / 'cache'}"]) == 0
    assert "from the cache" in (tmp_path / "cached" / "train.log").read_text()
    a = load_model(tmp_path / "online" / "student.safetensors").state_dict()
    b = load_model(tmp_path / "cached" / "student.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=k)


@pytest.mark.slow
def test_cache_without_fused_features_serves_lam0_and_is_refused_by_a_run_that_reads_them(cache_setup, teachers,
                                                                                          synth_root, tmp_path):
    """The fused-feature path is off by default: `mcad cache` of the default recipe (λ = 0) stores F's
    logits but not its fused features (h, h_img, h_txt); its batches equal a full cache's in
    everything else, and a run with λ > 0 refuses it in one line that gives the command rebuilding it."""
    from safetensors.torch import load_file

    from mcad.distill.cache import TeacherCache, main as cache_main
    from mcad.distill.recipe import main
    from mcad.distill.sampling import ConfuserBatches, caption_choice

    _, fusion, pixels, _, corpus, _, ref = cache_setup
    lean_dir = tmp_path / "lean"
    assert cache_main([f"data={synth_root}", f"teachers={teachers}", f"cache={lean_dir}", "threads=1"]) == 0
    lean, full = TeacherCache(lean_dir), TeacherCache(ref)
    assert lean.manifest["fused_features"] is False and full.manifest["fused_features"] is True
    assert set(load_file(str(lean_dir / "shard-00000.safetensors"))) == {"v", "t", "m_i2t", "m_t2i", "lists",
                                                                         "captions"}
    idx = ConfuserBatches(full.neighbours, 32, seed=0, group=4)(0)
    cap = caption_choice(len(pixels), corpus.image_captions(), 0, 0, idx)
    a, b = lean.batch(idx, cap), full.batch(idx, cap)
    for name in ("v", "t", "mask", "m_i2t", "m_t2i"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=2e-4, rtol=1e-4, msg=name)
    assert a.h.numel() == 0 and a.h_img.numel() == 0 and b.h.shape == (32, fusion.width)
    full.check_fused(1.0, "matched", 0.5)
    with pytest.raises(ValueError, match=r"built without fused features \(with loss.lam=0\), this run has "
                                         r"loss.lam=0.5 .*`mcad cache .* loss.lam=0.5`"):
        lean.check_fused(1.0, "matched", 0.5)
    with pytest.raises(ValueError, match="built without fused features") as e:  # through the command
        main([f"data={synth_root}", f"teachers={teachers}", f"out={tmp_path}", f"cache={lean_dir}", "loss.lam=0.5",
              "steps=1", "batch_size=8", "threads=1"])
    assert "\n" not in str(e.value)


# -- streaming and resume ---------------------------------------------------------------------------
class Interrupted(Exception):
    pass


def _shard_hashes(folder):
    import json

    return [(s["file"], s["sha256"]) for s in json.loads((folder / "manifest.json").read_text())["shards"]]


def test_cache_resumes_after_an_interruption_and_equals_one_build(cache_setup, tmp_path, caplog):
    """Shards are written as they fill: a build stopped after shard 1 leaves shards 0-1 and
    partial.json, no manifest; the same build again starts at shard 2 and ends with the very files
    one uninterrupted build writes. A partial build of other inputs is not resumed."""
    import logging

    from mcad.distill.cache import PARTIAL, build_cache

    dual, fusion, pixels, ids, corpus, lists, ref = cache_setup
    out = tmp_path / "c"

    def stop_after_1(i):
        if i == 1:
            raise Interrupted

    args = (dual, fusion, pixels, ids, corpus.image_captions(), lists, out)
    with pytest.raises(Interrupted):
        build_cache(*args, shard_images=50, progress=False, on_shard=stop_after_1)
    assert not (out / "manifest.json").exists() and (out / PARTIAL).exists()
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    built = []
    with caplog.at_level(logging.INFO, logger="mcad.cache"):
        build_cache(*args, shard_images=50, progress=False, on_shard=built.append)
    assert built == list(range(2, len(_shard_hashes(ref))))  # shards 0 and 1 were not computed again
    assert "resuming after 2 of" in caplog.text
    assert _shard_hashes(out) == _shard_hashes(ref) and not (out / PARTIAL).exists()
    # another shard size is another build: nothing of the partial one is taken
    with pytest.raises(Interrupted):
        build_cache(*args, shard_images=40, progress=False, on_shard=stop_after_1)
    built.clear()
    build_cache(*args, shard_images=50, progress=False, on_shard=built.append)
    assert built[0] == 0 and _shard_hashes(out) == _shard_hashes(ref)
    # and the 40-image build's extra shards (it wrote more files) are gone: the tool wrote them
    assert sorted(p.name for p in out.glob("shard-*")) == [f for f, _ in _shard_hashes(ref)]


def test_cache_resumes_after_sigkill(teachers, synth_root, tmp_path):
    """A real kill: `mcad cache` killed by SIGKILL right after its second shard, then run again, ends
    with the files of an uninterrupted `mcad cache` (same command, one thread: bit for bit)."""
    import json
    import os
    import signal
    import subprocess
    import sys

    out, ref = tmp_path / "killed", tmp_path / "uninterrupted"
    code = ("import os, signal, sys\n"
            "import mcad.distill.cache as c\n"
            "real = c.build_cache\n"
            "def build(*a, **k):\n"
            "    k['on_shard'] = lambda i: os.kill(os.getpid(), signal.SIGKILL) if i == 1 else None\n"
            "    return real(*a, **k)\n"
            "c.build_cache = build\n"
            "sys.exit(c.main(sys.argv[1:]))\n")
    args = [f"data={synth_root}", f"teachers={teachers}", f"cache={out}", "threads=1", "cache_shard_images=50"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "mcad.cli", "cache", *args[:2], f"cache={ref}", *args[3:]], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not (out / "manifest.json").exists() and len(json.loads((out / "partial.json").read_text())["shards"]) == 2
    r = subprocess.run([sys.executable, "-m", "mcad.cli", "cache", *args], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming after 2 of" in (out / "cache.log").read_text()
    assert _shard_hashes(out) == _shard_hashes(ref)
