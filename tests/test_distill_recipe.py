"""The real student recipe on tiny teachers for two steps, every variant."""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def teachers(synth_root, tmp_path_factory):
    from mcad.teachers import main

    out = tmp_path_factory.mktemp("teachers")
    assert main([f"data={synth_root}", f"out={out}", "dual.steps=2", "fusion.steps=2", "dual.batch_size=16",
                 "fusion.batch_size=8", "threads=1", "eval.rerank_k=4"]) == 0
    return out


@pytest.mark.parametrize("variant", ["none", "dual", "single", "mcad"])
def test_student_recipe_two_steps(variant, teachers, synth_root, tmp_path):
    from mcad.distill.recipe import main
    from mcad.runs import load_student

    rc = main([f"data={synth_root}", f"teachers={teachers}", f"out={tmp_path}", f"name=s-{variant}",
               f"variant={variant}", "steps=2", "batch_size=16", "adapters.steps=2", "adapters.batch_size=8",
               "threads=1", "loss.k=4", "warmup=1"])
    assert rc == 0
    run = tmp_path / f"s-{variant}"
    m = json.loads((run / "metrics.json").read_text())
    assert m["variant"] == variant
    assert m["params"]["student"] <= m["params"]["dual_teacher"] / 10
    assert 0 <= m["test"]["student"]["rsum"] <= 600
    model, tok = load_student(run)
    assert model.embed_dim == 64 and tok.context_length == 24
    log = (run / "train.log").read_text()
    assert "student" in log


def test_unknown_variant_is_an_error(teachers, synth_root, tmp_path):
    from mcad.distill.recipe import main

    with pytest.raises(ValueError, match="variant"):
        main([f"data={synth_root}", f"teachers={teachers}", f"out={tmp_path}", "variant=bogus"])
