"""Resume is bit-exact; the teacher recipe runs end to end for two steps."""
from __future__ import annotations

import json

import pytest
import torch

from mcad.distill.sampling import ConfuserBatches, RandomBatches
from mcad.distill.trainer import Trainer


def _run(tmp_path, stop_at=None, resume=False, steps=6, lr=1e-2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    cfg = {"steps": steps, "lr": lr, "warmup": 2, "ckpt_every": 1, "grad_clip": 0.5}
    tr = Trainer({"m": model}, cfg, tmp_path / "ckpt.pt", desc="t", recipe=cfg)
    if resume:
        assert tr.resume()
    batches = RandomBatches(64, 8, seed=3)
    data = torch.randn(64, 8, generator=torch.Generator().manual_seed(5))

    def loss_fn(step):
        x = data[batches(step)]
        noise = torch.randn(x.shape[0], 4)  # uses the global RNG: its state must resume too
        return ((model(x) - noise) ** 2).mean(), {}

    tr.fit(loss_fn, stop_at=stop_at, progress=False)
    return model, tr


def test_resume_is_bit_exact(tmp_path):
    full, tr_full = _run(tmp_path / "a")
    _run(tmp_path / "b", stop_at=3)
    resumed, tr_res = _run(tmp_path / "b", resume=True)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert [h["loss"] for h in tr_full.history] == [h["loss"] for h in tr_res.history]


def test_resume_under_another_recipe_is_refused(tmp_path):
    import pytest

    _run(tmp_path, stop_at=3)
    with pytest.raises(ValueError, match="another recipe.*lr"):
        _run(tmp_path, resume=True, lr=5e-3)


def test_corrupt_checkpoint_is_reported(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"torn")
    import pytest

    with pytest.raises(ValueError, match="ckpt.pt"):
        _run(tmp_path, resume=True)


def test_batches_are_a_function_of_step():
    rb = RandomBatches(100, 16, seed=1)
    assert (rb(7) == RandomBatches(100, 16, seed=1)(7)).all()
    nb = torch.arange(100).roll(1).view(-1, 1).repeat(1, 3).numpy()
    cb = ConfuserBatches(nb, 16, seed=2, group=2)
    b = cb(4)
    assert len(set(b.tolist())) == 16
    anchors = cb.anchors(4)
    assert all(nb[a, 0] in b for a in anchors[:4])


def test_nearest_neighbours_against_brute_force_with_and_without_keys():
    from mcad.distill.sampling import nearest_neighbours

    g = torch.Generator().manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(300, 8, generator=g), dim=1)
    keys = torch.randint(0, 60, (300,), generator=g).numpy()  # ~5 rows per key, like scenes
    sim = (emb @ emb.T).numpy()
    for kk in (None, keys):
        got = nearest_neighbours(emb, 4, chunk=64, keys=kk)
        for i in range(300):
            allowed = [j for j in range(300) if j != i and (kk is None or kk[j] != kk[i])]
            ref = sorted(allowed, key=lambda j: -sim[i, j])[:4]
            assert got[i].tolist() == ref, i


def test_teacher_recipe_two_steps(synth_root, tmp_path):
    from mcad.distill.teachers import main

    out = tmp_path / "teachers"
    args = [f"data={synth_root}", f"out={out}", "dual.steps=2", "fusion.steps=2", "dual.batch_size=16",
            "fusion.batch_size=8", "threads=1", "eval.rerank_k=4"]
    rc = main(args)
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    rows = m["test"]
    assert set(rows) == {"dual teacher", "fusion teacher (re-rank dual top-4)"}
    # the recorded metrics are the saved models': `mcad eval` of the files gives the same numbers
    from mcad.evaluate import main as eval_main

    assert eval_main([str(out / "dual.safetensors"), f"fusion={out / 'fusion.safetensors'}", f"data={synth_root}",
                      "k=4", f"json={tmp_path / 'eval.json'}"]) == 0
    again = list(json.loads((tmp_path / "eval.json").read_text()).values())
    recorded = [rows["dual teacher"], rows["fusion teacher (re-rank dual top-4)"]]
    for got, want in zip(again, recorded):
        assert got["rsum"] == pytest.approx(want["rsum"], abs=1e-6), (got, want)
    assert (out / "dual.safetensors").exists() and (out / "fusion.safetensors").exists()
    assert m["params"]["fusion"] > m["params"]["dual"]
    # finished models are not retrained: a second call of the same recipe only evaluates
    before = (out / "dual.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "dual.safetensors").stat().st_mtime_ns == before
