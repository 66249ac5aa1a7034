"""The embedded benchmark: deterministic, readable by the real loader, and its ceiling is R@1 = 100
(only for a model that binds colours to shapes and reads the relation)."""
from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest

from mcad.data.karpathy import load_karpathy
from mcad.data.synthetic import (COLOURS, SHAPES, SHAPE_WORDS, Scene, all_scenes, captions_for,
                                 ceiling_check, generate, parse_caption)
from mcad.retrieval import retrieval_metrics


def digest(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    base = tmp_path_factory.mktemp("det")
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate(base / name, seed=seed, n_train=24, n_val=8, n_test=12, progress=False)
    return base


def test_deterministic_by_seed(small):
    a, b, c = digest(small / "a"), digest(small / "b"), digest(small / "c")
    assert a == b  # same seed: byte-identical JSON and images
    assert len(a) == 24 + 8 + 12 + 1
    assert a["dataset_synth.json"] != c["dataset_synth.json"]
    differing = [k for k in a if k.startswith("images/") and a[k] != c.get(k)]
    assert len(differing) > 30


def test_karpathy_loader_reads_it(synth_root):
    data = json.loads((synth_root / "dataset_synth.json").read_text())
    assert data["dataset"] == "synth" and data["seed"] == 0
    for split, n in (("train", 240), ("val", 40), ("test", 100)):
        c = load_karpathy(synth_root / "dataset_synth.json", split=split)
        assert c.n_images == n and c.n_captions == 5 * n and not c.report.problems
        assert c.caption_to_image.tolist() == np.repeat(np.arange(n), 5).tolist()
        assert all(m["split"] == split and set(m["scene"]) == {"c1", "s1", "c2", "s2", "axis"} for m in c.meta)
        # every caption describes its own image's scene
        for cap, i in zip(c.captions, c.caption_to_image.tolist()):
            assert parse_caption(cap) == Scene(**c.meta[i]["scene"])


def test_ceiling_check_passes(synth_root):
    for split, n in (("test", 100), ("val", 40)):
        r = ceiling_check(synth_root / "dataset_synth.json", split)
        assert r["images"] == n and r["captions"] == 5 * n
        assert r["unique_descriptions"] == n
        assert r["captions_not_matching_own_scene"] == 0
        assert r["share_with_both_confusers_present"] == 1.0
        assert r["r1_ceiling_t2i"] == 100.0 and r["r1_ceiling_i2t"] == 100.0
    # test and val descriptions are disjoint
    data = json.loads((synth_root / "dataset_synth.json").read_text())
    keys = {s: {Scene(**e["scene"]).key for e in data["images"] if e["split"] == s} for s in ("val", "test")}
    assert not keys["val"] & keys["test"]


def test_ceiling_check_catches_broken_files(synth_root, tmp_path):
    data = json.loads((synth_root / "dataset_synth.json").read_text())
    tests = [e for e in data["images"] if e["split"] == "test"]
    # a caption of another scene
    wrong = json.loads(json.dumps(data))
    t = [e for e in wrong["images"] if e["split"] == "test"]
    t[0]["sentences"][0]["raw"] = t[1]["sentences"][0]["raw"]
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    r = ceiling_check(tmp_path / "wrong.json")
    assert r["captions_not_matching_own_scene"] == 1 and r["r1_ceiling_t2i"] is None
    # two test images with one description
    dup = json.loads(json.dumps(data))
    t = [e for e in dup["images"] if e["split"] == "test"]
    t[1]["scene"] = dict(t[0]["scene"])
    (tmp_path / "dup.json").write_text(json.dumps(dup))
    with pytest.raises(AssertionError, match="share a description"):
        ceiling_check(tmp_path / "dup.json")
    assert len(tests) == 100


def test_parse_caption_inverts_captions_for():
    rng = random.Random(123)
    scenes = all_scenes()
    assert len(scenes) == len({s.key for s in scenes}) == 40 * 39 * 2
    for _ in range(1500):
        scene = rng.choice(scenes)
        caps = captions_for(scene, rng, 5)
        assert len(caps) == 5 and len(set(caps)) == 5
        for cap in caps:
            assert parse_caption(cap) == scene, cap
    # every colour, shape word, relation phrase and template is exercised by some caption
    words = " ".join(captions_for(s, random.Random(k), 5)[0] for k, s in enumerate(scenes[::7]))
    assert all(c in words for c in COLOURS) and all(any(w in words for w in SHAPE_WORDS[s]) for s in SHAPES)
    with pytest.raises(ValueError):
        parse_caption("a red circle and a blue square")


def test_confusers_differ_by_binding():
    s = Scene("red", "circle", "blue", "square", "h")
    assert s.relation_swap() == Scene("blue", "square", "red", "circle", "h")
    assert s.colour_swap() == Scene("blue", "circle", "red", "square", "h")
    assert len({s.key, s.relation_swap().key, s.colour_swap().key, s.colour_swap().relation_swap().key}) == 4


def scene_sims(corpus, caption_scene) -> np.ndarray:
    img = [Scene(**m["scene"]) for m in corpus.meta]
    return np.array([[1.0 if caption_scene(cap, s) else 0.0 for cap in corpus.captions] for s in img],
                    dtype=np.float32)


def test_oracle_reaches_ceiling(synth_root):
    corpus = load_karpathy(synth_root / "dataset_synth.json", split="test")
    sim = scene_sims(corpus, lambda cap, s: parse_caption(cap) == s)
    m = retrieval_metrics(sim, corpus.caption_to_image)
    assert m["i2t_r1"] == 100.0 and m["t2i_r1"] == 100.0 and m["rsum"] == 600.0


def test_bag_of_words_oracle_cannot(synth_root):
    """A perfect bag-of-words matcher ties the four confusers of a group: with pessimistic ties it
    ranks its own image 4th (t2i R@1 = 0, R@5 = 100) and, per image, 15 tied confuser captions
    ahead of its own (i2t R@10 = 0): that is what makes the benchmark about binding."""
    corpus = load_karpathy(synth_root / "dataset_synth.json", split="test")

    def bow(cap, s):
        p = parse_caption(cap)
        return {p.c1, p.s1, p.c2, p.s2} == {s.c1, s.s1, s.c2, s.s2}

    m = retrieval_metrics(scene_sims(corpus, bow), corpus.caption_to_image)
    assert m["t2i_r1"] == 0.0 and m["i2t_r1"] == 0.0
    assert m["t2i_r5"] == 100.0 and m["i2t_r10"] == 0.0


def test_cli_generates_once(tmp_path, capsys):
    from mcad.data.cli import main

    out = tmp_path / "synth"
    args = [f"out={out}", "n_train=8", "n_val=0", "n_test=8", "progress=false"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["generated"] and first["splits"]["test"] == {"images": 8, "captions": 40}
    assert "val" not in first["splits"] and first["ceiling"]["test"]["captions_not_matching_own_scene"] == 0
    assert json.loads((out / "ceiling.json").read_text())["splits"] == first["splits"]
    mtime = (out / "dataset_synth.json").stat().st_mtime_ns
    assert main(args) == 0  # idempotent: reused, not regenerated
    assert json.loads(capsys.readouterr().out)["generated"] is False
    assert (out / "dataset_synth.json").stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="seed=0 \\(asked 5\\).*force=true"):
        main([f"out={out}", "seed=5"])
    with pytest.raises(ValueError, match="n_tset: unknown key; did you mean n_test"):
        main([f"out={out}", "n_tset=4"])
    assert main([f"out={out}", "n_train=4", "n_val=4", "n_test=4", "force=true", "progress=false"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["generated"] and again["splits"]["val"]["images"] == 4
    assert len(list((out / "images").glob("*.png"))) == 12  # stale images of the first run removed
