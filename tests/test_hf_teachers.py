"""Real-teacher wrappers on TINY randomly initialised transformers models saved to tmp (offline)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_tokenizer_clip import make_clip_tokenizer_folder  # noqa: E402  (tests/ is on sys.path)

from mcad.models.hf_teachers import BLIPITMTeacher, CLIPTeacher, load_teacher  # noqa: E402
from tiny_hf import bert_vocab, save_tiny_blip  # noqa: E402,F401  (test_real_path imports it from here)

CAPTIONS = ["a photo of a cat", "Two dogs, playing in the park!!", "", "the red car " * 40,
            "a man riding a bike down the street", "café 東京 🚗 42"]
MEAN, STD = [0.4, 0.45, 0.5], [0.25, 0.26, 0.27]


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def _pixels(n, size, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- fixtures: tiny HF folders ----------------------------------------------------------------
@pytest.fixture(scope="module", params=["eos", "legacy-eos"])
def clip_folder(request, tmp_path_factory):
    """save_pretrained folder: tiny CLIPModel + CLIP tokenizer.json + preprocessor_config.json.
    'legacy-eos' uses eos_token_id=2 as openai/clip-vit-base-patch32's config does (HF pools by argmax)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("hf-clip")
    tok = make_clip_tokenizer_folder(folder)
    torch.manual_seed(0)
    eos = tok.eos_token_id if request.param == "eos" else 2
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=eos, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    transformers.CLIPModel(cfg).eval().save_pretrained(str(folder))
    CLIPImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                          image_mean=MEAN, image_std=STD).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def blip_folder(tmp_path_factory):
    """save_pretrained folder: tiny BlipForImageTextRetrieval + BERT tokenizer.json."""
    folder = tmp_path_factory.mktemp("hf-blip")
    save_tiny_blip(folder)
    return folder


@pytest.fixture(scope="module")
def clip_teacher(clip_folder):
    return load_teacher({"source": "hf-clip", "path": str(clip_folder)})


@pytest.fixture(scope="module")
def blip_teacher(blip_folder):
    return load_teacher({"source": "hf-blip-itm", "path": str(blip_folder)})


# -- CLIP ---------------------------------------------------------------------------------------
def test_clip_teacher_matches_hf(clip_teacher, clip_folder):
    t = clip_teacher
    assert isinstance(t, CLIPTeacher) and t.kind == "dual" and not t.training
    assert (t.embed_dim, t.image_size, t.context_length) == (16, 32, 77)
    assert t.image_mean == pytest.approx(MEAN) and t.image_std == pytest.approx(STD)
    assert not any(p.requires_grad for p in t.parameters())
    ref = transformers.CLIPModel.from_pretrained(str(clip_folder), local_files_only=True).eval()
    ids = torch.from_numpy(t.tokenizer.encode_batch(CAPTIONS))
    assert ((ids == t.tokenizer.eot_id).sum(1) == 1).all() and t.tokenizer.pad_id == 0
    px = _pixels(3, 32)
    with torch.no_grad():
        txt, img = t.encode_text(ids), t.encode_image(px)
        assert txt.shape == (len(CAPTIONS), 16) and img.shape == (3, 16)
        assert torch.allclose(txt.norm(dim=-1), torch.ones(len(CAPTIONS)), atol=1e-5)
        assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-5)
        hf_txt = _unit(ref.get_text_features(input_ids=ids).pooler_output)
        assert torch.allclose(txt, hf_txt, atol=1e-5)
        assert torch.allclose(txt, _unit(ref.get_text_features(input_ids=ids, attention_mask=t.attention_mask(ids))
                                         .pooler_output), atol=1e-5)
        assert torch.allclose(img, _unit(ref.get_image_features(pixel_values=px).pooler_output), atol=1e-5)
        # HF's own tokenization (padded with <|endoftext|>, its attention mask) gives the same embedding
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(clip_folder), local_files_only=True)
        enc = hf_tok(CAPTIONS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
        assert torch.allclose(txt, _unit(ref.get_text_features(**enc).pooler_output), atol=1e-5)
        # tokens, logit scale, determinism
        assert t.image_tokens(px).shape == (3, 1 + (32 // 8) ** 2, 32)
        assert t.text_tokens(ids).shape == (len(CAPTIONS), 77, 32)
        assert torch.equal(t.encode_text(ids), txt) and torch.equal(t.encode_image(px), img)
        i2, t2, scale = t(px, ids)
        assert torch.equal(i2, img) and torch.equal(t2, txt) and scale.ndim == 0
    again = load_teacher({"source": "hf-clip", "path": str(clip_folder)})
    with torch.no_grad():
        assert torch.equal(again.encode_text(ids), txt)


def test_clip_preprocess_matches_hand_reference(clip_teacher, clip_folder):
    from PIL import Image

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(50, 81, 3), dtype=np.uint8)  # H=50, W=81
    im = Image.fromarray(arr)
    # resize shortest side 50 -> 36 (long side int(36 * 81 / 50) = 58), bicubic; crop 32 at (top 2, left 13)
    r = np.asarray(im.resize((58, 36), Image.BICUBIC), dtype=np.float64)[2:34, 13:45] / 255.0
    ref = ((r - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)[None]
    for src in (im, arr, arr.transpose(2, 0, 1).copy(), [im]):
        got = clip_teacher.preprocess(src)
        assert got.dtype == torch.float32 and got.shape == (1, 3, 32, 32)
        assert np.allclose(got.numpy(), ref, atol=1e-5)
    # portrait orientation and a batch, against transformers' own (PIL) CLIP image processor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tall = rng.integers(0, 256, size=(77, 41, 3), dtype=np.uint8)
    proc = CLIPImageProcessorPil.from_pretrained(str(clip_folder), local_files_only=True)
    hf = proc([Image.fromarray(arr), Image.fromarray(tall)], return_tensors="pt")["pixel_values"]
    got = torch.cat([clip_teacher.preprocess(arr), clip_teacher.preprocess(tall)])
    assert got.shape == hf.shape == (2, 3, 32, 32)
    assert torch.allclose(got, hf.float(), atol=1e-4)


# -- BLIP ---------------------------------------------------------------------------------------
def test_blip_tokenizer_matches_hf(blip_teacher, blip_folder):
    tok = blip_teacher.tokenizer
    assert (tok.kind, tok.context_length, tok.pad_id) == ("bert", 35, 0)
    ref = transformers.AutoTokenizer.from_pretrained(str(blip_folder), local_files_only=True)
    hf = np.asarray(ref(CAPTIONS, padding="max_length", truncation=True, max_length=35)["input_ids"])
    assert np.array_equal(tok.encode_batch(CAPTIONS), hf)


def test_blip_teacher_matches_hf_itm(blip_teacher, blip_folder):
    t = blip_teacher
    assert isinstance(t, BLIPITMTeacher) and t.kind == "fusion" and not t.training
    assert (t.embed_dim, t.width, t.image_size) == (16, 32, 32)
    ref = transformers.BlipForImageTextRetrieval.from_pretrained(str(blip_folder), local_files_only=True).eval()
    ids = torch.from_numpy(t.tokenizer.encode_batch(CAPTIONS[:4]))
    mask = (ids != 0).long()
    px = _pixels(4, 32, seed=1)
    with torch.no_grad():
        img_tok, txt_tok = t.image_tokens(px), t.text_tokens(ids)
        assert img_tok.shape == (4, 17, 32)
        h, m = t.fuse(img_tok, txt_tok, ids)
        assert h.shape == (4, 32) and m.shape == (4,)
        out = ref(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=True)
        assert torch.allclose(h, out.question_embeds[:, 0, :], atol=1e-5)
        assert torch.allclose(m, out.itm_score[:, 1] - out.itm_score[:, 0], atol=1e-5)
        assert torch.equal(t(px, ids)[1], m)  # deterministic
        # arbitrary pairs == fusing each pair directly
        ii, tt = torch.tensor([0, 1, 2, 3, 0, 3, 1]), torch.tensor([0, 0, 1, 3, 2, 1, 3])
        hs, ms = t.score_pairs(img_tok, txt_tok, ids, ii, tt, batch_size=3)
        h2, m2 = t.fuse(img_tok[ii], txt_tok[tt], ids[tt])
        assert torch.allclose(hs, h2, atol=1e-5) and torch.allclose(ms, m2, atol=1e-5)
        assert torch.allclose(ms[:4][[0, 3]], m[[0, 3]], atol=1e-5)
        # ITC candidates == transformers' use_itm_head=False similarity
        img, txt = t.encode_image(px), t.encode_text(ids)
        assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
        assert torch.allclose(txt.norm(dim=-1), torch.ones(4), atol=1e-5)
        itc = ref(input_ids=ids, pixel_values=px, attention_mask=mask, use_itm_head=False).itm_score
        assert torch.allclose(img @ txt.T, itc, atol=1e-5)


def test_blip_enc_token_option(blip_folder):
    t = load_teacher({"source": "hf-blip-itm", "path": str(blip_folder), "first_token": "enc"})
    ref = transformers.BlipForImageTextRetrieval.from_pretrained(str(blip_folder), local_files_only=True).eval()
    ids = torch.from_numpy(t.tokenizer.encode_batch(CAPTIONS[:2]))
    enc_ids = ids.clone()
    enc_ids[:, 0] = bert_vocab().index("[ENC]")
    px = _pixels(2, 32, seed=2)
    with torch.no_grad():
        h, m = t(px, ids)
        out = ref(input_ids=enc_ids, pixel_values=px, attention_mask=(ids != 0).long(), use_itm_head=True)
    assert torch.allclose(h, out.question_embeds[:, 0, :], atol=1e-5)
    assert torch.allclose(m, out.itm_score[:, 1] - out.itm_score[:, 0], atol=1e-5)


# -- loading --------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["hf-clip", "hf-blip-itm", "mcad"])
def test_missing_teacher_is_one_line_error(tmp_path, source):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError) as e:
        load_teacher({"source": source, "path": str(missing)})
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg
    if source != "mcad":
        assert "huggingface-cli download" in msg


def test_folder_without_weights_is_one_line_error(tmp_path, clip_folder):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "config.json").write_text((clip_folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError) as e:
        load_teacher({"source": "hf-clip", "path": str(folder)})
    assert "\n" not in str(e.value) and "weights" in str(e.value) and str(folder) in str(e.value)
    with pytest.raises(ValueError, match="unknown teacher source"):
        load_teacher({"source": "open-clip", "path": str(folder)})


def test_load_mcad_teacher(tmp_path):
    from mcad.models.checkpoint import save_model
    from mcad.models.registry import create_model, with_tokenizer
    from mcad.tokenizer import train_bpe

    tok = train_bpe(["a photo of a cat", "two dogs in the park", "a red car"] * 5, vocab_size=64, context_length=12)
    torch.manual_seed(0)
    model = create_model("student-tiny", **with_tokenizer({}, tok)).eval()
    save_model(model, tmp_path / "teacher.safetensors")
    tok.save(tmp_path / "tokenizer.json")
    t = load_teacher({"source": "mcad", "path": str(tmp_path / "teacher.safetensors")})
    assert t.kind == "dual" and t.tokenizer is not None and not any(p.requires_grad for p in t.parameters())
    ids = torch.from_numpy(tok.encode_batch(["a cat", "a red car"]))
    with torch.no_grad():
        assert torch.equal(t.encode_text(ids), model.encode_text(ids))
    assert json.loads((tmp_path / "teacher.config.json").read_text())["type"] == "dual"


def test_processor_saved_whole_is_read(tmp_path, clip_folder):
    """A CLIP folder whose image settings live only in processor_config.json (what saving a whole
    CLIPProcessor writes) gets its own size and mean/std, not the OpenAI defaults."""
    import shutil

    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from mcad.models.hf_teachers import load_teacher

    folder = tmp_path / "clip-processor"
    shutil.copytree(clip_folder, folder)
    (folder / "preprocessor_config.json").unlink()
    mean, std = [0.1, 0.2, 0.3], [0.6, 0.5, 0.4]
    ip = CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                               image_mean=mean, image_std=std)
    tok = transformers.CLIPTokenizerFast.from_pretrained(str(clip_folder), local_files_only=True)
    transformers.CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(str(folder))
    assert not (folder / "preprocessor_config.json").exists() and (folder / "processor_config.json").exists()
    teacher = load_teacher({"source": "hf-clip", "path": str(folder)})
    assert list(teacher.image_mean) == mean and list(teacher.image_std) == std
    assert (teacher.image_size, teacher.resize_size) == (32, 40)
