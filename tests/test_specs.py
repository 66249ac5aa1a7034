"""The data spec, the teacher spec, recipes that start from another, and the device option: the keys
every training command shares (mcad.data.spec, mcad.teacher_spec, mcad.config, mcad.accelerator)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mcad.config import ConfigError, load_command_config
from mcad.data import spec as data_spec
from mcad.teacher_spec import shorthands


def student_cfg(*argv):
    return load_command_config(list(argv), "student", shorthands=shorthands())


# -- data spec -------------------------------------------------------------------------------------
def test_data_shorthand_and_the_embedded_default():
    cfg = student_cfg()
    assert data_spec.parse(cfg["data"]).describe() == "data/synth"  # what `data=` recorded before specs
    assert data_spec.parse(student_cfg("data=data/synth")["data"]).describe() == "data/synth"
    for path, want in [("x/dataset_coco.json", {"format": "karpathy", "json": "x/dataset_coco.json"}),
                       ("x/train.tsv", {"format": "csv", "csv": "x/train.tsv"}),
                       ("s/train-{000..009}.tar", {"format": "wds", "shards": "s/train-{000..009}.tar"}),
                       ("some/folder", {"format": "synth", "root": "some/folder"})]:
        spec = data_spec.parse(student_cfg(f"data={path}")["data"])
        assert {"format": spec.format, **spec.args} == want
    # the shorthand expands in place: a later data.<key> still applies, an earlier one is kept
    cfg = student_cfg("data.max_images=5", "data=a.json", "data.image_root=imgs")
    spec = data_spec.parse(cfg["data"])
    assert spec.args == {"json": "a.json", "image_root": "imgs", "max_images": 5}
    assert spec.describe() == "data.format=karpathy data.image_root=imgs data.json=a.json data.max_images=5"


@pytest.mark.parametrize("spec, match", [
    ({"format": "synth", "json": "x.json"}, r"data.json: not read by data.format=synth .* set data.format=karpathy"),
    ({"format": "karpathy", "jsn": "x.json"}, r"data.jsn: unknown key .* did you mean data.json\?"),
    ({"format": "csv"}, r"data.format=csv: needs data.csv"),
    ({"format": "parquet"}, r"unknown data format 'parquet' \(valid: karpathy, csv, wds, synth\)"),
    ({"format": "karpathy", "json": "x.json", "max_images": -3}, r"data.max_images=-3: must be a positive integer"),
])
def test_bad_data_specs_are_one_line(spec, match):
    with pytest.raises(ValueError, match=match) as e:
        data_spec.parse(spec)
    assert "\n" not in str(e.value)


def test_the_data_keys_of_every_recipe_are_the_spec_keys():
    from mcad.config import read_yaml
    from mcad.evaluate import eval_options

    for recipe in ("student", "teachers", "flickr30k", "coco"):
        assert set(read_yaml(recipe)["data"]) == set(data_spec.DATA_DEFAULTS), recipe
    assert eval_options()["data"] == data_spec.DATA_DEFAULTS


def test_an_empty_split_names_the_file_and_the_fix(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "images" / "a.png")
    j = tmp_path / "d.json"
    j.write_text(json.dumps({"images": [{"filename": "a.png", "split": "train", "sentences": [{"raw": "a cat"}]}]}))
    assert data_spec.load_corpus({"format": "karpathy", "json": str(j)}, "train").n_images == 1
    with pytest.raises(ValueError) as e:
        data_spec.load_corpus({"format": "karpathy", "json": str(j)}, "test")
    msg = str(e.value)
    assert "\n" not in msg and str(j) in msg and "split 'test'" in msg and "images per split: train 1" in msg
    (tmp_path / "train.csv").write_text("filepath,caption\nimages/a.png,a cat\n")
    (tmp_path / "test.csv").write_text("filepath,caption\nimages/missing.png,a dog\n")
    spec = {"format": "csv", "csv": {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}}
    assert data_spec.load_corpus(spec, "train").captions == ["a cat"]
    with pytest.raises(ValueError, match=r"test.csv: no usable image-caption pairs .* data.csv=\{train: ..., test: ...\}"):
        data_spec.load_corpus(spec, "test")
    with pytest.raises(ValueError, match=r"data.csv has no entry for split 'val'"):
        data_spec.load_corpus(spec, "val")


def test_load_split_of_the_synthetic_set_is_the_old_one(synth_root):
    """spec.load_split on the embedded default reads what teachers.load_split read before specs:
    the same Karpathy file, image paths and pixel cache."""
    from mcad.data.images import load_images
    from mcad.data.karpathy import load_karpathy

    px, c = data_spec.load_split(str(synth_root), "test", 64, progress=False)
    ref_px, ref = load_images(load_karpathy(synth_root / "dataset_synth.json", split="test"), 64, progress=False)
    assert c.image_paths == ref.image_paths and c.captions == ref.captions and np.array_equal(px, ref_px)
    assert list(synth_root.glob("pixels_test_64_*.npz"))  # kept beside the synthetic set, as before


# -- recipes that start from another ---------------------------------------------------------------
def test_recipe_base_and_its_typos(tmp_path):
    cfg = load_command_config(["data.json=/d/dataset_flickr30k.json"], "flickr30k", shorthands=shorthands())
    base = load_command_config([], "student")
    assert set(cfg) == set(base) and cfg["model"] == "student-mobile" and cfg["loss"] == base["loss"]
    assert cfg["data"]["format"] == "karpathy" and cfg["data"]["json"] == "/d/dataset_flickr30k.json"
    assert (cfg["dual"]["source"], cfg["fusion"]["source"]) == ("hf-clip", "hf-blip-itm")
    bad = tmp_path / "mine.yaml"
    bad.write_text("base: student\nstpes: 3\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: stpes: unknown key; did you mean steps\?"):
        load_command_config([str(bad)], "student")
    bad.write_text("base: student\nloss:\n  alpah: 3\n")
    with pytest.raises(ConfigError, match=r"mine.yaml: loss.alpah: unknown key; did you mean loss.alpha\?"):
        load_command_config([str(bad)], "student")
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="leads back"):
        load_command_config([str(loop)], "student")


# -- teacher spec ----------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, match", [
    (["dual.source=hf-blip-itm", "dual.path=x"], r"dual.source=hf-blip-itm: expected one of mcad, hf-clip \(hf-blip-itm is a fusion"),
    (["fusion.source=open-clip", "fusion.path=x"], r"fusion.source=open-clip: expected one of mcad, hf-blip-itm"),
    (["dual.source=hf-clip"], r"dual.source=hf-clip: needs dual.path="),
])
def test_bad_teacher_specs_are_one_line(argv, match):
    from mcad.teacher_spec import specs

    with pytest.raises(ValueError, match=match):
        specs(student_cfg(*argv))


def test_teacher_shorthand_reads_the_folder(tmp_path):
    from mcad.teacher_spec import cache_dir, is_default, specs

    for name, model_type, source in (("clip", "clip", "hf-clip"), ("blip", "blip", "hf-blip-itm")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": model_type}))
    cfg = student_cfg(f"dual={tmp_path / 'clip'}", f"fusion={tmp_path / 'blip'}", "out=o")
    sp = specs(cfg)
    assert (sp["dual"].source, sp["fusion"].source) == ("hf-clip", "hf-blip-itm") and not is_default(cfg)
    assert specs(student_cfg("fusion=t/fusion.safetensors"))["fusion"].source == "mcad"
    # the cache of these teachers is theirs, not the one of runs/teachers
    assert cache_dir(student_cfg()) == cache_dir(student_cfg("data=data/synth")) == \
        __import__("pathlib").Path("runs/teachers/cache")
    assert cache_dir(cfg).parent.as_posix() == "o/teacher-cache"
    assert cache_dir(cfg) != cache_dir(student_cfg(f"dual={tmp_path / 'clip'}", f"fusion={tmp_path / 'blip'}",
                                                   "out=o", "data=x.json"))


def test_student_takes_the_teachers_image_size_it_can_take():
    from types import SimpleNamespace

    from mcad.models.registry import student_overrides
    from mcad.tokenizer import train_bpe

    tok = train_bpe(["a red circle", "a blue square"] * 4, vocab_size=40, context_length=12)
    same = SimpleNamespace(image_size=64, image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    assert set(student_overrides("student-tiny", same, tok)) == {"text"}  # nothing else differs: built as before
    clip = SimpleNamespace(image_size=224, image_mean=(0.48, 0.46, 0.41), image_std=(0.27, 0.26, 0.28))
    over = student_overrides("student-mobile", clip, tok)
    assert "image" not in over and over["image_mean"] == [0.48, 0.46, 0.41]  # already 224
    assert student_overrides("student-tiny", clip, tok)["image"] == {"image_size": 224}
    with pytest.raises(ValueError) as e:
        student_overrides("student-mobile", SimpleNamespace(**{**vars(clip), "image_size": 200}), tok)
    msg = str(e.value)
    assert "\n" not in msg and "model=student-mobile: cannot take the dual teacher's 200 px" in msg
    assert "multiple of 32" in msg and "model=student-tiny-vit" in msg


# -- device ----------------------------------------------------------------------------------------
def test_device_option():
    from mcad.accelerator import resolve_device

    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='tpu': expected one of auto, cpu, cuda"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError) as e:
            resolve_device("cuda")
        assert "\n" not in str(e.value) and "no CUDA GPU here" in str(e.value) and "device=cpu" in str(e.value)


def test_device_cuda_without_a_gpu_is_one_line_at_the_command(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from mcad.cli import main

    for cmd in ("student", "cache", "teachers"):
        assert main([cmd, "device=cuda", "data=/nonexistent"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"mcad {cmd}: error: device=cuda: no CUDA GPU here" in err[0], err


def test_distributed_backend_follows_the_device():
    from mcad.distributed import backend, local_device

    assert backend("cpu") == "gloo" and backend(torch.device("cuda")) == "nccl"
    assert local_device("cpu") == torch.device("cpu")


def test_on_device_wrapper_gives_the_models_outputs(teachers):
    """OnDevice (how the cache and the online teachers run on a GPU) on the CPU: the same numbers as
    the model, float32 on the CPU, token sequences fed back into fuse."""
    from mcad.accelerator import OnDevice
    from mcad.models.checkpoint import load_model

    fusion = load_model(teachers / "fusion.safetensors")
    wrapped = OnDevice(fusion, torch.device("cpu"))
    px = torch.randn(3, 3, 64, 64)
    ids = torch.randint(3, 100, (3, 24))
    with torch.no_grad():
        assert torch.equal(wrapped.encode_image(px), fusion.encode_image(px))
        img_tok, txt_tok = wrapped.image_tokens(px), wrapped.text_tokens(ids)
        h, m = wrapped.score_pairs(img_tok, txt_tok, ids, torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 2]))
        h2, m2 = fusion.score_pairs(fusion.image_tokens(px), fusion.text_tokens(ids), ids,
                                    torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 2, 2]))
    assert torch.equal(h, h2) and torch.equal(m, m2) and h.dtype == torch.float32
    assert wrapped.width == fusion.width and wrapped.image_mean == fusion.image_mean
