"""Modified teacher features that do not leak the caption (issue 15.2, `loss.fused=candidates`):
hand-computed values on small tensors, and the image-side target of a batch does not move when the
batch draws another of the image's captions (it does in the old `matched` form)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mcad.distill.losses import FusionAdapters, candidate_mix, fused_features, modified_features

STUDIES = Path(__file__).resolve().parents[1] / "benchmarks" / "studies" / "configs"


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def test_candidate_mix_hand_computed():
    h = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])     # [1 row, 3 candidates, W = 2]
    m = torch.tensor([[0.0, math.log(3.0), 7.0]])
    valid = torch.tensor([[True, True, False]])                   # the third is padding
    # softmax over the valid two at τ_F = 1: 1/4, 3/4
    torch.testing.assert_close(candidate_mix(h, m, valid, 1.0), torch.tensor([[0.25, 1.5]]))
    # τ_F = 0.5 squares the odds: 1/10, 9/10
    torch.testing.assert_close(candidate_mix(h, m, valid, 0.5), torch.tensor([[0.1, 1.8]]))
    # NaN logits where not valid (the cache's padding) and a row with no candidate at all
    m_nan = torch.tensor([[0.0, math.log(3.0), float("nan")], [float("nan")] * 3])
    out = candidate_mix(torch.cat([h, h]), m_nan, torch.tensor([[True, True, False], [False] * 3]), 1.0)
    torch.testing.assert_close(out, torch.tensor([[0.25, 1.5], [0.0, 0.0]]))


def test_adapters_take_a_text_side_feature_of_its_own():
    ad = FusionAdapters(2, 2)
    with torch.no_grad():
        ad.img.weight.copy_(torch.eye(2))
        ad.txt.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    v, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    h_img, h_txt = torch.tensor([[0.0, 2.0]]), torch.tensor([[4.0, 0.0]])
    v_m, t_m = ad(v, t, h_img, 0.5, h_txt)
    torch.testing.assert_close(v_m, unit(torch.tensor([[1.0, 1.0]])))      # v + ½·(0, 2)
    torch.testing.assert_close(t_m, unit(torch.tensor([[0.0, 3.0]])))      # t + ½·swap(4, 0) = (0, 1 + 2)
    # without h_txt both sides read h, as before
    v_0, t_0 = ad(v, t, h_img, 0.5)
    torch.testing.assert_close(t_0, unit(torch.tensor([[1.0, 1.0]])))


class Batch:  # the fields of distill.cache.TeacherOutputs the features read
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_fused_forms():
    torch.manual_seed(0)
    tb = Batch(v=unit(torch.randn(3, 4)), t=unit(torch.randn(3, 4)), h=torch.randn(3, 6),
               h_img=torch.randn(3, 6), h_txt=torch.randn(3, 6))
    assert fused_features(tb, "matched") == (tb.h, tb.h)
    assert fused_features(tb, "candidates") == (tb.h_img, tb.h_txt)
    ad = FusionAdapters(6, 4)
    with torch.no_grad():
        ad.img.weight.normal_()
        ad.txt.weight.normal_()
    for got, want in zip(modified_features(ad, tb, 0.3, "matched"), ad(tb.v, tb.t, tb.h, 0.3)):
        assert torch.equal(got, want)  # the matched form is the old call
    with pytest.raises(ValueError, match="loss.fused='mix'"):
        fused_features(tb, "mix")
    with pytest.raises(ValueError, match="format 2"):
        fused_features(Batch(h=tb.h, h_img=torch.zeros(0), h_txt=torch.zeros(0)), "candidates")


# -- on real (tiny) teachers: cache and online agree, and no caption leaks ------------------------
@pytest.fixture(scope="module")
def fused_cache(teachers, synth_root, tmp_path_factory):
    from mcad.distill.cache import TeacherCache, build_cache, candidate_lists, dual_neighbours
    from mcad.evaluate import image_keys
    from mcad.models.checkpoint import load_model
    from mcad.distill.teachers import load_split
    from mcad.tokenizer import Tokenizer

    dual, fusion = load_model(teachers / "dual.safetensors"), load_model(teachers / "fusion.safetensors")
    tok = Tokenizer.load(teachers / "tokenizer.json")
    pixels, corpus = load_split(synth_root, "train", dual.image_size)
    ids = tok.encode_batch(corpus.captions)
    lists = candidate_lists(dual_neighbours(dual, pixels, 3, image_keys(corpus)))
    out = tmp_path_factory.mktemp("fused-cache")
    build_cache(dual, fusion, pixels, ids, corpus.image_captions(), lists, out, shard_images=100, progress=False,
                tau_f=0.7)
    return dual, fusion, pixels, ids, corpus, lists, TeacherCache(out)


def adapters_with_weights(h_dim, dim):
    torch.manual_seed(4)
    ad = FusionAdapters(h_dim, dim)
    with torch.no_grad():  # zero-initialised adapters would hide any difference
        ad.img.weight.normal_()
        ad.txt.weight.normal_()
    return ad


def test_cache_holds_what_running_f_gives(fused_cache):
    from mcad.data.images import normalize
    from mcad.distill.cache import caption_table, online_candidate_features
    from mcad.distill.sampling import ConfuserBatches, caption_choice

    dual, fusion, pixels, ids, corpus, lists, cache = fused_cache
    assert cache.manifest["format"] == "mcad-teacher-cache/3" and cache.manifest["fused_tau_f"] == 0.7
    caps = corpus.image_captions()
    idx = ConfuserBatches(cache.neighbours, 24, seed=0, group=4)(0)
    cap = caption_choice(len(pixels), caps, 0, 0, idx)
    cached = cache.batch(idx, cap)
    h_img, h_txt = online_candidate_features(fusion, lambda j: normalize(pixels[j], dual.image_mean, dual.image_std), ids,
                                             caption_table(caps), lists, idx, cap, 0.7)
    torch.testing.assert_close(cached.h_img, h_img, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(cached.h_txt, h_txt, atol=2e-4, rtol=1e-4)
    # the image side is a mix of F's features of the image with its candidate captions, not the
    # matched pair's feature
    assert not torch.allclose(cached.h_img, cached.h, atol=1e-3)


def test_image_side_target_does_not_depend_on_the_drawn_caption(fused_cache):
    """Swap the caption the batch drew for image 0 (another of its own captions): with
    loss.fused=candidates the image-side targets ṽ of every image stay equal; with the old matched
    form image 0's target moves with the caption."""
    from mcad.distill.sampling import ConfuserBatches, caption_choice

    dual, fusion, pixels, ids, corpus, lists, cache = fused_cache
    caps = corpus.image_captions()
    idx = ConfuserBatches(cache.neighbours, 24, seed=0, group=4)(1)
    cap_a = caption_choice(len(pixels), caps, 0, 1, idx)
    cap_b = cap_a.copy()
    cap_b[0] = next(c for c in caps[idx[0]] if c != cap_a[0])    # another caption of the same image
    rng = np.random.default_rng(0)
    cap_c = np.array([rng.choice(caps[i]) for i in idx])        # every caption drawn anew
    ad = adapters_with_weights(fusion.width, dual.embed_dim)
    a, b, c = cache.batch(idx, cap_a), cache.batch(idx, cap_b), cache.batch(idx, cap_c)

    v_a, t_a = modified_features(ad, a, 1.0, "candidates")
    v_b, t_b = modified_features(ad, b, 1.0, "candidates")
    v_c, _ = modified_features(ad, c, 1.0, "candidates")
    assert torch.equal(v_a, v_b) and torch.equal(v_a, v_c)
    assert torch.equal(t_a[1:], t_b[1:])           # the other captions' targets do not move either
    assert not torch.allclose(t_a[0], t_b[0])      # caption 0's own target is about caption 0

    old_a, _ = modified_features(ad, a, 1.0, "matched")
    old_b, _ = modified_features(ad, b, 1.0, "matched")
    assert not torch.allclose(old_a[0], old_b[0], atol=1e-4)  # the leak the candidates form removes
    assert torch.equal(old_a[1:], old_b[1:])


def test_cache_refuses_what_it_cannot_serve(fused_cache):
    cache = fused_cache[-1]
    cache.check_fused(0.7)
    with pytest.raises(ValueError, match=r"loss.tau_f=0.7, the config has loss.tau_f=1.0: rebuild it"):
        cache.check_fused(1.0)
    h_img = cache.h_img
    try:  # a format-2 cache holds no h_img/h_txt
        cache.h_img = None
        with pytest.raises(ValueError, match=r"holds no fused features.*rebuild it"):
            cache.check_fused(0.7)
        assert cache.batch(np.array([0, 1]), np.array([0, 5])).h_img.numel() == 0
    finally:
        cache.h_img = h_img


def test_student_with_candidate_features_cached_equals_online(teachers, synth_root, tmp_path):
    from mcad.distill.cache import main as cache_main
    from mcad.distill.recipe import main
    from mcad.models.checkpoint import load_model

    common = [f"data={synth_root}", f"teachers={teachers}", f"out={tmp_path}", "variant=mcad", "steps=2",
              "batch_size=16", "adapters.steps=2", "adapters.batch_size=8", "threads=1", "warmup=1",
              "loss.lam=1.0", "loss.fused=candidates"]
    assert main([*common, "name=online", f"cache={tmp_path / 'nocache'}"]) == 0
    assert cache_main([f"data={synth_root}", f"teachers={teachers}", f"cache={tmp_path / 'cache'}", "threads=1", "loss.lam=1.0"]) == 0
    assert main([*common, "name=cached", f"cache={tmp_path / 'cache'}"]) == 0
    a = load_model(tmp_path / "online" / "student.safetensors").state_dict()
    b = load_model(tmp_path / "cached" / "student.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4, rtol=1e-3, msg=k)
    with pytest.raises(ValueError, match=r"loss.tau_f=1.0, the config has loss.tau_f=0.5"):
        main([*common, "name=other-tau", f"cache={tmp_path / 'cache'}", "loss.tau_f=0.5"])
    with pytest.raises(ValueError, match="loss.fused='both'"):
        main([*common[:-1], "loss.fused=both", "name=bad"])


def test_records_leave_out_the_new_keys_at_their_defaults():
    from mcad.config import load_config
    from mcad.distill.recipe import without_new_defaults

    cfg = load_config("student")
    assert cfg["train_split"] == "train" and cfg["loss"]["fused"] == "matched"
    rec = without_new_defaults(cfg)
    assert "train_split" not in rec and "fused" not in rec["loss"] and rec["loss"]["lam"] == cfg["loss"]["lam"]
    web = load_config(STUDIES / "student-weblabels.yaml")
    assert without_new_defaults(web)["train_split"] == "distill"
    assert without_new_defaults(web)["loss"]["fused"] == "candidates"


def test_ablation_named_variant_and_paired_r1():
    from mcad.distill.ablation import markdown, summarize

    def r(rsum, r1):
        return {"i2t_r1": r1, "t2i_r1": r1, "i2t_r5": 0, "i2t_r10": 0, "t2i_r5": 0, "t2i_r10": 0, "rsum": rsum}

    res = {"dual": {0: r(300, 50), 1: r(310, 52)}, "mcad": {0: r(306, 53), 1: r(318, 56)},
           "mcad-lam0": {0: r(301, 51), 1: r(311, 52)}}
    s = summarize(res)
    assert s["paired"]["mcad - mcad-lam0"]["per_seed"] == {"0": 5, "1": 7}
    assert s["paired"]["mcad-lam0 - dual"]["mean"] == 1
    assert s["paired_r1"]["mcad - dual"]["per_seed"] == {"0": 3, "1": 4}
    md = markdown(s, {"seeds": [0, 1], "command": "x", "date": "d", "machine": "m"})
    assert "Paired R@1 differences" in md and "| mcad - mcad-lam0 |" in md


def test_weblabels_recipes_run_end_to_end(tmp_path):
    """The declared pipeline at toy sizes through the shipped recipes: data with a distillation
    split, teachers-strong, the cache over the distill split, and the ablation's variants
    (none, MCAD in the leak-free form, MCAD at λ = 0) from the cache."""
    import json

    from mcad.data.cli import main as data_main
    from mcad.distill.ablation import main as ablation_main
    from mcad.distill.cache import TeacherCache, main as cache_main
    from mcad.distill.teachers import main as teachers_main

    data, teachers, cache = tmp_path / "web", tmp_path / "teachers", tmp_path / "cache"
    assert data_main([f"out={data}", "n_train=64", "n_val=0", "n_test=16", "n_distill=32", "distill_captions=2",
                      "web_partial=0.5", "web_wrong=0.2", "progress=false"]) == 0
    assert teachers_main([str(STUDIES / "teachers-strong.yaml"), f"data={data}", f"out={teachers}", "dual.steps=2", "fusion.steps=2",
                          "dual.batch_size=16", "fusion.batch_size=8", "threads=1", "eval.rerank_k=4"]) == 0
    student = [f"data={data}", f"teachers={teachers}", f"cache={cache}", "threads=1"]
    assert cache_main([str(STUDIES / "student-weblabels.yaml"), *student]) == 0
    assert len(TeacherCache(cache).lists) == 32  # over the distillation split, not the teachers' train split
    assert ablation_main([str(STUDIES / "student-weblabels.yaml"), *student, f"out={tmp_path / 'runs'}", "variants=none,mcad,mcad-lam0",
                          "seeds=0", "steps=2", "batch_size=16", "adapters.steps=2", "adapters.batch_size=8",
                          "warmup=1", f"results={tmp_path / 'res'}"]) == 0
    res = json.loads((tmp_path / "res" / "ablation.json").read_text())
    assert set(res["results"]) == {"none", "mcad", "mcad-lam0"} and "mcad - mcad-lam0" in res["summary"]["paired"]
    m = json.loads((tmp_path / "runs" / "ablation" / "mcad-s0" / "metrics.json").read_text())
    assert m["config"]["loss"]["fused"] == "candidates" and m["config"]["loss"]["lam"] == 1.0
    assert m["teacher_outputs"].startswith("cache")
    assert json.loads((tmp_path / "runs" / "ablation" / "mcad-lam0-s0" / "metrics.json").read_text())["config"]["loss"]["lam"] == 0.0
    assert "fusion adapters" in (tmp_path / "runs" / "ablation" / "mcad-s0" / "train.log").read_text()
