"""Issue 15's data regime: a distillation split with web-like captions (exact shares partial and
wrong, seeded) beside an unchanged clean benchmark, and the held-out caption templates."""
from __future__ import annotations

import hashlib
import json
import random

import pytest

from mcad.data.karpathy import load_karpathy
from mcad.data.synthetic import (HELDOUT_TEMPLATES, TEMPLATE_SETS, TEMPLATES, all_scenes, captions_for,
                                 ceiling_check, generate, parse_caption, web_check)

SMALL = {"n_train": 24, "n_val": 8, "n_test": 12, "progress": False}
WEB = {"n_distill": 40, "distill_captions": 5, "web_partial": 0.4, "web_wrong": 0.2}


def digest(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    base = tmp_path_factory.mktemp("web")
    generate(base / "clean", seed=0, **SMALL)
    generate(base / "web", seed=0, **SMALL, **WEB)
    generate(base / "web2", seed=0, **SMALL, **WEB)
    generate(base / "heldout", seed=0, **SMALL, **WEB, templates="heldout")
    return base


def entries(root, split=None):
    data = json.loads((root / "dataset_synth.json").read_text())
    return [e for e in data["images"] if split is None or e["split"] == split]


def test_distill_split_leaves_the_benchmark_as_it_was(sets):
    clean, web = digest(sets / "clean"), digest(sets / "web")
    # every image of train/val/test is byte-identical; the distillation images come on top
    assert {k: v for k, v in web.items() if k.startswith("images/") and "distill_" not in k} == \
        {k: v for k, v in clean.items() if k.startswith("images/")}
    assert sum("distill_" in k for k in web) == 40
    assert [e for e in entries(sets / "web") if e["split"] != "distill"] == entries(sets / "clean")
    assert digest(sets / "web") == digest(sets / "web2")  # seeded
    # the test split stays clean: the ceiling holds
    r = ceiling_check(sets / "web" / "dataset_synth.json", "test")
    assert r["captions_not_matching_own_scene"] == 0 and r["r1_ceiling_t2i"] == 100.0


def test_stated_shares_are_exact_and_measured(sets):
    r = web_check(sets / "web" / "dataset_synth.json")
    assert r["captions"] == 200 and (r["partial"], r["wrong"], r["clean"]) == (80, 40, 80)
    assert r["kind_not_as_recorded"] == 0
    kinds = [s["web"] for e in entries(sets / "web", "distill") for s in e["sentences"]]
    assert {"one", "pair", "relation", "colour", "clean"} == set(kinds)
    for e in entries(sets / "web", "distill"):
        for s in e["sentences"]:
            if s["web"] in ("relation", "colour"):  # a full caption of a confuser, never of its own scene
                scene = parse_caption(s["raw"])
                own = e["scene"]
                assert (scene.c1, scene.s1, scene.c2, scene.s2, scene.axis) != tuple(own.values())
    meta = json.loads((sets / "web" / "dataset_synth.json").read_text())["web"]
    assert meta == WEB


def test_loader_reads_the_distill_split(sets):
    c = load_karpathy(sets / "web" / "dataset_synth.json", split="distill")
    assert c.n_images == 40 and c.n_captions == 200 and not c.report.problems
    assert load_karpathy(sets / "web" / "dataset_synth.json", split="train").n_images == 24  # not mixed in


def test_heldout_templates_parse_and_are_new(sets):
    assert not set(HELDOUT_TEMPLATES) & set(TEMPLATES)
    for name in ("one", "pair"):
        assert not set(TEMPLATE_SETS["heldout"][name]) & set(TEMPLATE_SETS["default"][name])
    rng = random.Random(5)
    scenes = all_scenes()
    for _ in range(800):
        scene = rng.choice(scenes)
        for cap in captions_for(scene, rng, 5, HELDOUT_TEMPLATES):
            assert parse_caption(cap) == scene, cap
    r = ceiling_check(sets / "heldout" / "dataset_synth.json", "test")
    assert r["captions_not_matching_own_scene"] == 0
    assert web_check(sets / "heldout" / "dataset_synth.json")["kind_not_as_recorded"] == 0
    data = json.loads((sets / "heldout" / "dataset_synth.json").read_text())
    assert data["templates"] == "heldout"
    default_caps = {s["raw"] for e in entries(sets / "web") for s in e["sentences"]}
    heldout_caps = {s["raw"] for e in data["images"] for s in e["sentences"]}
    assert not default_caps & heldout_caps


def test_cli_web_options(tmp_path, capsys):
    from mcad.data.cli import main

    out = tmp_path / "w"
    args = [f"out={out}", "n_train=8", "n_val=0", "n_test=8", "n_distill=8", "distill_captions=2",
            "web_partial=0.5", "web_wrong=0.25", "progress=false"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["splits"]["distill"] == {"images": 8, "captions": 16}
    assert (res["web"]["partial"], res["web"]["wrong"]) == (8, 4)
    assert json.loads((out / "ceiling.json").read_text())["web"] == res["web"]
    assert main(args) == 0 and json.loads(capsys.readouterr().out)["generated"] is False
    with pytest.raises(ValueError, match=r"web_wrong=0.25 \(asked 0.1\).*force=true"):
        main([f"out={out}", "web_wrong=0.1"])
    with pytest.raises(ValueError, match=r"templates=default \(asked heldout\)"):
        main([f"out={out}", "templates=heldout"])
    for bad, msg in (("web_partial=1.5", "web_partial=1.5: must be between 0 and 1"), ("templates=other", "expected one of default, heldout")):
        with pytest.raises(ValueError, match=msg):
            main([f"out={tmp_path / 'x'}", "n_distill=4", bad, "progress=false"])
    with pytest.raises(ValueError, match="more than all captions"):
        main([f"out={tmp_path / 'x'}", "n_distill=4", "web_partial=0.7", "web_wrong=0.5"])
    with pytest.raises(ValueError, match="give n_distill > 0"):
        main([f"out={tmp_path / 'x'}", "web_wrong=0.1"])
