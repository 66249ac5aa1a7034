"""Students that start from their teacher (distill/inherit.py, mcad/models/clip_student.py): the kept
layers equal the teacher's weights bit for bit, the inherited student's first forward equals the
teacher run with only the kept layers (the project's dual teacher and a tiny random CLIPModel), the
CLIPModel student loads with transformers alone, and the shapes that cannot inherit are one line."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from mcad.distill.inherit import InheritError, inherit_student
from mcad.models.prune import evenly_spaced
from mcad.models.registry import create_model


def randomize_bn(model: nn.Module, seed: int = 3) -> None:
    """Non-trivial BatchNorm statistics, so that slicing them wrongly shows."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def teacher(name="teacher-dual", seed=0, **over):
    torch.manual_seed(seed)
    t = create_model(name, **over).eval()
    randomize_bn(t)
    return t


def inputs(model, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(n, 3, model.image_size, model.image_size, generator=g)
    ids = torch.randint(3, model.text.vocab_size, (n, model.context_length), generator=g)
    ids[:, -1] = model.text.eot_id
    return px, ids


def truncated(t, text_layers, image_blocks=None, vit_layers=None):
    """The teacher run with only the kept layers (the reference an inherited student must equal)."""
    t = copy.deepcopy(t)
    t.text.blocks = nn.ModuleList(t.text.blocks[i] for i in text_layers)
    if vit_layers is not None:
        t.visual.blocks = nn.ModuleList(t.visual.blocks[i] for i in vit_layers)
    if image_blocks is not None:
        t.visual.body = nn.Sequential(*[t.visual.body[i] for i in image_blocks])
    return t


def test_layer_rule():
    assert evenly_spaced(4, 2) == [0, 3]
    assert evenly_spaced(4, 3) == [0, 2, 3]
    assert evenly_spaced(12, 6) == [0, 2, 4, 7, 9, 11]
    assert evenly_spaced(5, 1) == [0] and evenly_spaced(3, 3) == [0, 1, 2]
    with pytest.raises(ValueError):
        evenly_spaced(2, 3)


@torch.no_grad()
def test_depth_only_student_equals_truncated_teacher_conv():
    """teacher-dual (plain conv, depths 1,2,2,1; text 4 layers) -> depths 1,1,1,1 and 2 text layers."""
    t = teacher()
    s = inherit_student("teacher-dual", t, overrides={"image": {"depths": [1, 1, 1, 1]}, "text": {"layers": 2}}).eval()
    rec = s.inheritance
    assert rec["towers"]["text"]["layers"] == [0, 3] and rec["towers"]["image"]["blocks"] == [[0], [0], [0], [0]]
    assert rec["scratch"] == []
    # body: stem 0, stage 0: [1], stage 1: [2, 3], stage 2: [4, 5], stage 3: [6]; each stage's first block kept
    ref = truncated(t, [0, 3], image_blocks=[0, 1, 2, 4, 6]).eval()
    px, ids = inputs(t)
    assert torch.equal(s.encode_image(px), ref.encode_image(px))
    assert torch.equal(s.encode_text(ids), ref.encode_text(ids))
    assert torch.equal(s.logit_scale, t.logit_scale)
    for j, i in enumerate([0, 3]):  # kept layers bit for bit
        for (k, a), (_, b) in zip(s.text.blocks[j].state_dict().items(), t.text.blocks[i].state_dict().items()):
            assert torch.equal(a, b), k


@torch.no_grad()
def test_depth_only_student_equals_truncated_teacher_vit_and_attention_pool():
    vit = {"type": "vit", "image_size": 64, "patch_size": 8, "width": 96, "layers": 4, "heads": 4, "mlp_ratio": 2.0}
    t = teacher("student-tiny-vit", image=vit, text={"layers": 3})
    s = inherit_student("student-tiny-vit", t, overrides={"image": {**vit, "layers": 2}, "text": {"layers": 2}}).eval()
    ref = truncated(t, evenly_spaced(3, 2), vit_layers=[0, 3]).eval()
    px, ids = inputs(t)
    assert torch.equal(s.encode_image(px), ref.encode_image(px))
    assert torch.equal(s.encode_text(ids), ref.encode_text(ids))
    # a conv teacher with an attention pool: the pool is kept whole
    t = teacher(image={"pool": "attn", "heads": 4})
    s = inherit_student("teacher-dual", t, overrides={"image": {"pool": "attn", "heads": 4, "depths": [1, 1, 2, 1]}}).eval()
    ref = truncated(t, [0, 1, 2, 3], image_blocks=[0, 1, 2, 4, 5, 6]).eval()
    assert torch.equal(s.encode_image(px), ref.encode_image(px))


def rows_in(small: torch.Tensor, big: torch.Tensor) -> list[int]:
    """For each row of `small`, the one row of `big` that equals it bit for bit."""
    index: dict[bytes, list[int]] = {}
    for i, r in enumerate(big.contiguous()):
        index.setdefault(r.numpy().tobytes(), []).append(i)
    hits = [index.get(r.numpy().tobytes(), []) for r in small.contiguous()]
    assert all(len(h) == 1 for h in hits), "a student row is not exactly one teacher row"
    return [h[0] for h in hits]


@torch.no_grad()
def test_narrow_text_tower_is_a_slice_of_the_teacher():
    """student-tiny's text tower (2 layers, width 64, 2 heads of 32, MLP 256) from teacher-dual's (4 layers,
    192, 4 heads of 48, MLP 768): every weight a slice, heads and MLP units chosen by their L1 norms."""
    t = teacher()
    s = inherit_student("student-tiny", t, towers="text")
    R = rows_in(s.text.tok.weight.T, t.text.tok.weight.T)  # the kept channels, found from the embedding
    assert R == sorted(R) and len(R) == 64
    assert torch.equal(s.text.pos, t.text.pos[:, :, R]) and torch.equal(s.text.ln.weight, t.text.ln.weight[R])
    for j, i in enumerate([0, 3]):
        sb, tb = s.text.blocks[j], t.text.blocks[i]
        assert torch.equal(sb.ln1.weight, tb.ln1.weight[R]) and torch.equal(sb.attn.out.bias, tb.attn.out.bias[R])
        M = rows_in(sb.mlp.fc1.weight, tb.mlp.fc1.weight[:, R])
        l1 = tb.mlp.fc1.weight[:, R].abs().sum(1) + tb.mlp.fc2.weight[R].abs().sum(0)
        assert set(M) == set(torch.topk(l1, 256).indices.tolist())
        assert torch.equal(sb.mlp.fc2.weight, tb.mlp.fc2.weight[R][:, M])
        q = rows_in(sb.attn.q.weight, tb.attn.q.weight[:, R])
        heads = sorted({r // 48 for r in q})
        w = tb.attn.kv.weight
        score = [tb.attn.q.weight[h * 48:(h + 1) * 48, R].abs().sum() + w[h * 48:(h + 1) * 48, R].abs().sum()
                 + w[192 + h * 48:192 + (h + 1) * 48, R].abs().sum() + tb.attn.out.weight[R, h * 48:(h + 1) * 48].abs().sum()
                 for h in range(4)]
        assert heads == sorted(torch.topk(torch.stack(score), 2).indices.tolist())
        assert [r // 48 for r in q] == [heads[0]] * 32 + [heads[1]] * 32
        assert torch.equal(sb.attn.kv.weight[:64], w[:192][q][:, R])  # keys: the same rows as the queries
    # the image tower was not asked for: it is the scratch student's, under the same seed
    torch.manual_seed(7)
    scratch = create_model("student-tiny", text={"vocab_size": 512})
    torch.manual_seed(7)
    s = inherit_student("student-tiny", t, towers="text")
    assert all(torch.equal(a, b) for a, b in zip(s.visual.state_dict().values(), scratch.visual.state_dict().values()))
    assert all(k.startswith(("visual.", "image_proj.")) for k in s.inheritance["scratch"])


@torch.no_grad()
def test_narrow_mlp_equals_teacher_with_dropped_units_zeroed():
    t = teacher()
    s = inherit_student("teacher-dual", t, towers="text", overrides={"text": {"mlp_ratio": 2.0}}).eval()
    ref = copy.deepcopy(t)
    for sb, rb in zip(s.text.blocks, ref.text.blocks):
        M = rows_in(sb.mlp.fc1.weight, rb.mlp.fc1.weight)
        drop = sorted(set(range(rb.mlp.fc1.out_features)) - set(M))
        rb.mlp.fc2.weight[:, drop] = 0
    _, ids = inputs(t)
    torch.testing.assert_close(s.encode_text(ids), ref.encode_text(ids), rtol=0, atol=1e-6)


def one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_shapes_that_cannot_inherit_are_one_line():
    t = teacher()
    with pytest.raises(InheritError) as e:
        inherit_student("student-tiny", t)
    one_line(e, "image tower", "plain conv", "depthwise-separable conv", "init=scratch", "inherit.towers=text")
    with pytest.raises(InheritError) as e:
        inherit_student("student-tiny-vit", t)
    one_line(e, "image tower", "plain conv", "ViT", "init=scratch")
    with pytest.raises(InheritError) as e:
        inherit_student("teacher-dual", t, overrides={"text": {"width": 256}})
    one_line(e, "text tower", "256 channels", "192")
    with pytest.raises(InheritError) as e:
        inherit_student("teacher-dual", t, overrides={"text": {"layers": 6}})
    one_line(e, "text tower", "6 layers", "4")
    with pytest.raises(InheritError) as e:
        inherit_student("teacher-dual", t, overrides={"text": {"width": 128, "heads": 2}})
    one_line(e, "text tower", "heads 64 wide", "48 wide", "at least 3 heads")
    with pytest.raises(InheritError) as e:
        inherit_student("teacher-dual", t, overrides={"text": {"vocab_size": 300}})
    one_line(e, "text.vocab_size 300", "512", "tokenizer")
    with pytest.raises(InheritError) as e:
        inherit_student("teacher-dual", t, overrides={"image": {"widths": [32, 64, 128, 256, 256], "depths": [1] * 5}})
    one_line(e, "image tower", "5 conv stages", "4")
    with pytest.raises(InheritError) as e:
        inherit_student("teacher-dual", t, overrides={"image": {"depths": [1, 3, 1, 1]}})
    one_line(e, "stage 1", "depth 3", "depth 2")


# -- a transformers CLIPModel teacher ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random CLIPModel (4 layers per tower, width 32, 2 heads) with its tokenizer files."""
    transformers = pytest.importorskip("transformers")
    from tiny_hf import save_tiny_clip

    folder = save_tiny_clip(tmp_path_factory.mktemp("clip") / "teacher", image_size=32, patch_size=8)
    cfg = transformers.CLIPConfig.from_pretrained(str(folder))
    cfg.text_config.num_hidden_layers = cfg.vision_config.num_hidden_layers = 4
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).eval().save_pretrained(str(folder))
    return folder


def clip_inputs(t, n=3):
    g = torch.Generator().manual_seed(1)
    px = torch.randn(n, 3, t.image_size, t.image_size, generator=g)
    ids = torch.as_tensor(t.tokenizer.encode_batch(["a photo of a cat", "two dogs in the park", "a red car"][:n]))
    return px, ids


@torch.no_grad()
def test_clip_student_equals_truncated_teacher(clip_folder):
    from mcad.models.clip_student import CLIPStudent
    from mcad.models.hf_teachers import CLIPTeacher

    t = CLIPTeacher.from_pretrained(clip_folder)
    s = inherit_student("clip", clip_folder).eval()
    assert isinstance(s, CLIPStudent) and s.hf.config.text_config.num_hidden_layers == 2
    assert s.inheritance["towers"]["text"]["layers"] == [0, 3] == s.inheritance["towers"]["image"]["layers"]
    ref = copy.deepcopy(t.hf)
    for tower in (ref.text_model, ref.vision_model):
        tower.encoder.layers = nn.ModuleList(tower.encoder.layers[i] for i in (0, 3))
    px, ids = clip_inputs(t)
    want = ref.visual_projection(ref.vision_model(pixel_values=px).pooler_output)
    torch.testing.assert_close(s.encode_image(px, normalize=False), want, rtol=0, atol=1e-6)
    want = ref.text_projection(ref.text_model(input_ids=ids).pooler_output)
    torch.testing.assert_close(s.encode_text(ids, normalize=False), want, rtol=0, atol=1e-6)
    # the teacher's own text pooling (first <eot>, attention mask) agrees at the kept layers
    t.hf.text_model.encoder.layers = ref.text_model.encoder.layers
    torch.testing.assert_close(s.encode_text(ids), t.encode_text(ids), rtol=0, atol=1e-5)
    for j, i in enumerate((0, 3)):
        a = s.hf.vision_model.encoder.layers[j].state_dict()
        b = ref.vision_model.encoder.layers[j].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(s.hf.logit_scale, t.hf.logit_scale)


@pytest.mark.slow  # a second Python process importing transformers
@torch.no_grad()
def test_clip_narrow_student_is_a_slice_and_loads_with_transformers_alone(clip_folder, tmp_path):
    from mcad.models.checkpoint import save_model
    from mcad.models.clip_student import save_hf_folder
    from mcad.models.hf_teachers import CLIPTeacher
    from mcad.runs import load_student

    t = CLIPTeacher.from_pretrained(clip_folder)
    shape = {"type": "clip", "text": {"layers": 2, "width": 16, "heads": 1, "mlp": 32},
             "image": {"layers": 1, "width": 16, "heads": 1}, "embed_dim": 8}
    s = inherit_student(shape, t).eval()
    te, se = t.hf.text_model.embeddings, s.hf.text_model.embeddings
    R = rows_in(se.token_embedding.weight.T, te.token_embedding.weight.T)
    assert torch.equal(se.position_embedding.weight, te.position_embedding.weight[:, R])
    E = rows_in(s.hf.text_projection.weight, t.hf.text_projection.weight[:, R])
    assert len(E) == 8 and E == sorted(E)
    # through the mcad checkpoint and a run folder (what make export loads), then as transformers' own folder
    run = tmp_path / "run"
    run.mkdir()
    save_model(s, run / "student.safetensors")
    t.tokenizer.save(run / "tokenizer.json")
    back, tok = load_student(run)
    px, ids = clip_inputs(t)
    img, txt = s.encode_image(px), s.encode_text(ids)
    assert torch.equal(back.encode_image(px), img) and torch.equal(back.encode_text(ids), txt)
    enc = back.text_encoder()
    assert enc.text.eot_id == tok.eot_id and torch.equal(enc(ids), txt)
    folder = save_hf_folder(s, run / "student-hf")
    torch.save({"px": px, "ids": ids}, tmp_path / "x.pt")
    code = f"""
import json, sys, torch, transformers
m = transformers.CLIPModel.from_pretrained({str(folder)!r}).eval()
tok = transformers.AutoTokenizer.from_pretrained({str(folder)!r})
x = torch.load({str(tmp_path / 'x.pt')!r})
with torch.no_grad():
    img = m.get_image_features(pixel_values=x["px"])
    txt = m.get_text_features(input_ids=x["ids"])
img = getattr(img, "pooler_output", img); txt = getattr(txt, "pooler_output", txt)
torch.save({{"img": torch.nn.functional.normalize(img, dim=-1), "txt": torch.nn.functional.normalize(txt, dim=-1)}},
           {str(tmp_path / 'y.pt')!r})
print(json.dumps({{"mcad": any(k.split('.')[0] == 'mcad' for k in sys.modules), "ids": tok("a photo of a cat")["input_ids"]}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["mcad"] is False
    assert info["ids"] == [int(i) for i in ids[0][: len(info["ids"])]]
    y = torch.load(tmp_path / "y.pt")
    torch.testing.assert_close(y["img"], img, rtol=0, atol=1e-5)
    torch.testing.assert_close(y["txt"], txt, rtol=0, atol=1e-5)


def test_clip_bad_input_is_one_line(clip_folder, tmp_path):
    import shutil

    with pytest.raises(ValueError) as e:
        inherit_student({"type": "clip", "text": {"layers": 6}}, clip_folder)
    one_line(e, "text tower", "6 layers", "4")
    with pytest.raises(ValueError) as e:
        inherit_student({"type": "clip", "image": {"width": 64}}, clip_folder)
    one_line(e, "image tower", "64 channels", "32")
    with pytest.raises(ValueError) as e:
        inherit_student("student-mobile", clip_folder)
    one_line(e, "image tower", "CLIPModel", "model=student-mobile", "init=scratch", "model=clip")
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(clip_folder, bare)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (bare / f).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError) as e:
        inherit_student("clip", bare)
    one_line(e, str(bare), "tokenizer.json", "vocab.json + merges.txt")


def test_recipe_overrides_refuse_a_clip_student_where_it_cannot_be(clip_folder, tokenizer):
    from mcad.distill.inherit import student_overrides
    from mcad.models.hf_teachers import CLIPTeacher

    t = teacher()
    assert student_overrides("student-tiny", t, tokenizer)["text"]["vocab_size"] == tokenizer.vocab_size
    with pytest.raises(InheritError) as e:
        student_overrides("clip", t, tokenizer, init="inherit")
    one_line(e, "model=clip", "dual.source=hf-clip", "teacher-dual")
    clip = CLIPTeacher.from_pretrained(clip_folder)
    with pytest.raises(InheritError) as e:
        student_overrides("clip", clip, clip.tokenizer, init="scratch")
    one_line(e, "model=clip", "init=inherit")
    assert student_overrides({"type": "clip", "text": {"layers": 1}}, clip, clip.tokenizer, init="inherit") == {}
