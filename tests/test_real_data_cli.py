"""The tools speak real data: recipes take any data format by overrides, an evaluation says what it
read (and refuses one file for every split unless the split is named), a warmup longer than the run
warns, DataLoader workers end with their parent, and library noise stays out of the CLI's output."""
from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import run_cli
from mcad.config import ConfigError, load_command_config
from mcad.data import spec as data_spec
from mcad.teacher_spec import shorthands

REPO = Path(__file__).resolve().parents[1]


def recipe(argv: list[str], default: str = "student") -> dict:
    return load_command_config(argv, default, shorthands=shorthands())


# -- recipes take any data format by overrides -------------------------------------------------------
@pytest.mark.parametrize("name", ["flickr30k", "coco"])
def test_a_karpathy_recipe_takes_csv_by_overrides(name, caplog):
    with caplog.at_level(logging.INFO, logger="mcad.data"):
        cfg = recipe([name, "data.format=csv", "data.csv={train: a.csv, test: b.csv}"])
    spec = data_spec.parse(cfg["data"])
    assert spec == data_spec.DataSpec("csv", {"csv": {"train": "a.csv", "test": "b.csv"}})
    said = [r.getMessage() for r in caplog.records if r.name == "mcad.data"]
    assert len(said) == 1 and "data.json=" in said[0] and "data.image_root=" in said[0] and "left out" in said[0]
    # the shorthand is the same override; the recipe's other keys are untouched
    short = recipe([name, "data=a.csv"])
    assert data_spec.parse(short["data"]) == data_spec.DataSpec("csv", {"csv": "a.csv"})
    assert short["model"] == recipe([name])["model"] == "student-mobile"


def test_a_key_the_user_gives_that_the_format_does_not_read_is_still_refused():
    cfg = recipe(["flickr30k", "data.format=csv", "data.csv=a.csv", "data.json=x.json"])
    with pytest.raises(ValueError, match=r"^data.json: not read by data.format=csv .*leave data.json out$"):
        data_spec.parse(cfg["data"])
    # a key the new format reads, given by the user, is kept
    cfg = recipe(["flickr30k", "data.format=csv", "data.csv=a.csv", "data.image_root=/imgs"])
    assert data_spec.parse(cfg["data"]).args == {"csv": "a.csv", "image_root": "/imgs"}


def test_the_same_format_keeps_the_recipe_keys():
    cfg = recipe(["flickr30k", "data.format=karpathy", "data.json=/d/mine.json"])
    assert data_spec.parse(cfg["data"]).args == {"json": "/d/mine.json", "image_root": "data/flickr30k/images"}


@pytest.mark.parametrize("null", ["null", ""])
def test_null_unsets_a_recipe_key(null):
    cfg = recipe(["flickr30k", f"data.image_root={null}"])
    assert cfg["data"]["image_root"] is None and cfg["data"]["json"] == "data/flickr30k/dataset_flickr30k.json"
    cfg = recipe(["flickr30k", f"data.json={null}", "data.format=csv", "data.csv=a.csv"])
    assert data_spec.parse(cfg["data"]).args == {"csv": "a.csv"}
    # a key no recipe of the chain leaves null is not unset: `name=null` is a name
    assert recipe(["flickr30k", "name=null"])["name"] == "null"
    with pytest.raises(ConfigError, match=r"^steps: expected an int, got 'null'$"):
        recipe(["flickr30k", "steps=null"])


# -- an evaluation says what it read ---------------------------------------------------------------
@pytest.fixture(scope="module")
def split_csvs(synth_root, tmp_path_factory):
    """The synthetic set's train and test splits as two CSVs (image paths relative to its root)."""
    from mcad.data.karpathy import load_karpathy

    out = tmp_path_factory.mktemp("csv")
    for split in ("train", "test"):
        c = load_karpathy(synth_root / "dataset_synth.json", split=split)
        with open(out / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filepath", "caption"])
            w.writerows((os.path.relpath(c.image_paths[i], synth_root), cap)
                        for cap, i in zip(c.captions, c.caption_to_image.tolist()))
    return out


def test_eval_refuses_one_csv_for_every_split(tiny_run, split_csvs, capsys):
    train = split_csvs / "train.csv"
    code, err, out = run_cli(["eval", str(tiny_run), f"data={train}"], capsys)
    assert code == 1 and len(err) == 1 and not out, err
    assert f"data.csv={train}: one file serves every split" in err[0]
    assert "data.csv={train: ..., test: ...}" in err[0] and "split=test" in err[0], err


def test_eval_names_its_split_source_and_size(tiny_run, split_csvs, synth_root, tmp_path, capsys):
    from mcad.data.karpathy import load_karpathy

    test = load_karpathy(synth_root / "dataset_synth.json", split="test")
    mapping = f"data.csv={{train: {split_csvs / 'train.csv'}, test: {split_csvs / 'test.csv'}}}"
    named = f"data={split_csvs / 'test.csv'}"
    for i, args in enumerate([["data.format=csv", mapping], [named, "split=test"]]):
        out_json = tmp_path / f"eval{i}.json"
        code, err, out = run_cli(["eval", str(tiny_run), *args, f"data.image_root={synth_root}", "workers=0",
                                  f"json={out_json}"], capsys)
        assert code == 0, err
        line = f"split test: {split_csvs / 'test.csv'} ({test.n_images} images, {test.n_captions} captions)"
        assert line in out.splitlines(), out
        rec = json.loads(out_json.read_text())
        assert rec["data"]["split"] == "test" and rec["data"]["source"] == str(split_csvs / "test.csv")
        assert (rec["data"]["images"], rec["data"]["captions"]) == (test.n_images, test.n_captions)
        assert set(rec) == {"tiny", "data"} and 0 <= rec["tiny"]["rsum"] <= 600
    # the synthetic set's own Karpathy file holds its splits: no split needs naming
    code, err, out = run_cli(["eval", str(tiny_run), f"data={synth_root}", "split=val", "workers=0"], capsys)
    assert code == 0 and f"split val: {synth_root / 'dataset_synth.json'} (40 images," in out, (err, out)


# -- a warmup longer than the run warns --------------------------------------------------------------
def test_warmup_not_below_steps_warns_once_naming_both_keys(caplog):
    from mcad.checks import STUDENT, TEACHERS, require_counts

    with caplog.at_level(logging.WARNING, logger="mcad.config"):
        require_counts(recipe(["flickr30k", "steps=20"]), STUDENT)
    said = [r.getMessage() for r in caplog.records if r.name == "mcad.config"]
    assert said == ["warmup=300 is not below steps=20: the learning rate is still warming up at the last step and "
                    "never decays; set warmup below steps (e.g. warmup=2)"], said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mcad.config"):
        require_counts(recipe(["flickr30k", "steps=301"]), STUDENT)
        require_counts(recipe([], "teachers"), TEACHERS)
    assert not [r for r in caplog.records if r.name == "mcad.config"]
    with caplog.at_level(logging.WARNING, logger="mcad.config"):
        require_counts(recipe(["fusion.steps=5", "fusion.warmup=5"], "teachers"), TEACHERS)
    said = [r.getMessage() for r in caplog.records if r.name == "mcad.config"]
    assert len(said) == 1 and said[0].startswith("fusion.warmup=5 is not below fusion.steps=5:"), said
