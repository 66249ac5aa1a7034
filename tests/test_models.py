"""Every registered model gets the same checks (timm style): forward shapes, unit-norm outputs,
backward reaches every trainable parameter, safetensors round trip gives identical outputs."""
from __future__ import annotations

import pytest
import torch

from mcad.models.checkpoint import CheckpointError, load_model, save_model
from mcad.models.registry import count_params, create_model, list_models

SMALL_TEXT = {"vocab_size": 300, "context_length": 24, "eot_id": 2, "pad_id": 0}


def small(name: str):
    """Registered architecture, text vocab shrunk so the CLIP-vocab configs stay quick."""
    torch.manual_seed(0)
    cfg_over = {"text": SMALL_TEXT}
    if name.startswith("teacher-fusion"):
        cfg_over = {"dual": {"text": SMALL_TEXT}}
    return create_model(name, **cfg_over)


def inputs(model, batch: int = 3):
    dual = model if model.kind == "dual" else model.dual
    s, L = dual.image_size, dual.context_length
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, s, s, generator=g)
    ids = torch.randint(3, 300, (batch, L), generator=g)
    ids[:, 0] = 1
    lengths = [5, L - 1, 9][:batch]
    for i, n in enumerate(lengths):
        ids[i, n] = 2
        ids[i, n + 1:] = 0
    return pixels, ids


@pytest.mark.parametrize("name", list_models())
def test_forward_shapes_and_norm(name):
    model = small(name).eval()
    pixels, ids = inputs(model)
    with torch.no_grad():
        if model.kind == "dual":
            img, txt, scale = model(pixels, ids)
            assert img.shape == txt.shape == (3, model.embed_dim)
            assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
            assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-5)
            assert float(scale) > 1
        else:
            h, m = model(pixels, ids)
            assert h.shape == (3, model.width) and m.shape == (3,)
            assert torch.isfinite(m).all()


@pytest.mark.parametrize("name", list_models())
def test_backward_reaches_every_parameter(name):
    model = small(name).train()
    pixels, ids = inputs(model)
    if model.kind == "dual":
        img, txt, scale = model(pixels, ids)
        loss = (scale * img @ txt.T).logsumexp(1).sum() - (scale * (img * txt).sum(-1)).sum()
    else:
        h, m = model(pixels, ids)
        loss = m.square().sum() + h.sum()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing, f"no gradient reaches {missing[:5]}"


@pytest.mark.parametrize("name", list_models())
def test_safetensors_round_trip(name, tmp_path):
    model = small(name).eval()
    pixels, ids = inputs(model)
    path = save_model(model, tmp_path / "m.safetensors")
    assert (tmp_path / "m.config.json").exists()
    loaded = load_model(path)
    assert count_params(loaded) == count_params(model)
    with torch.no_grad():
        for a, b in zip(model(pixels, ids), loaded(pixels, ids)):
            assert torch.equal(a, b)


def test_text_pooling_ignores_padding():
    """Changing tokens after <eot> must not change the text embedding (causal mask + eot pooling)."""
    model = small("student-tiny").eval()
    _, ids = inputs(model)
    other = ids.clone()
    other[0, 7:] = 17  # after eot at position 5
    other[0, 5] = 2
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids)[0], model.encode_text(other)[0], atol=1e-6)


@pytest.mark.parametrize("name", [n for n in list_models() if not n.startswith("teacher-fusion")])
def test_text_cut_to_the_query_length_is_the_full_context(name):
    """Ids cut to any length that still holds the <eot> give the full context's embedding (causal
    mask + eot pooling): what lets a query program be traced at the length its queries need."""
    model = small(name).eval()
    if not hasattr(model.text, "causal_bias"):
        pytest.skip(f"{name}: not mcad's TextTower")
    _, ids = inputs(model)
    short = ids[[0, 2]]  # <eot> at 5 and 9
    with torch.no_grad():
        full = model.encode_text(short)
        for n in (10, 16):
            torch.testing.assert_close(model.encode_text(short[:, :n]), full, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match=r"cut to 8 of \d+ positions lose a row's <eot>"):
            model.encode_text(short[:, :8])  # the second row's <eot> is at 9


def test_student_is_a_tenth_of_the_dual_teacher():
    teacher = count_params(create_model("teacher-dual"))
    for name in ("student-tiny", "student-tiny-vit"):
        assert count_params(create_model(name)) <= teacher / 10


def test_corrupt_and_missing_checkpoints_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_model(bad)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "absent.safetensors")


def test_unknown_model_name():
    with pytest.raises(KeyError, match="unknown model"):
        create_model("no-such-model")
