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


# -- DataLoader workers end with their parent -----------------------------------------------------------
# A command (through mcad.cli) reading a tiny folder of images with one DataLoader worker built by
# mcad.data.scan._map (every loader of mcad is), whose second item blocks: the worker is busy, so only
# its tie to the parent (not torch's check between batches) can end it.
BLOCKING_COMMAND = r"""
import multiprocessing, sys, time, types
import numpy as np
from PIL import Image
from mcad import cli
from mcad.data.scan import _map

folder = sys.argv[1]
paths = []
for i in range(4):
    paths.append(f"{folder}/{i}.png")
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(paths[-1])

class Files:
    def __len__(self):
        return len(paths)
    def __getitem__(self, i):
        if i >= 1:
            time.sleep(120)
        return np.asarray(Image.open(paths[i]))

def main(argv):
    it = _map(Files(), 1)
    assert next(it).shape == (8, 8, 3)
    print("workers", *[p.pid for p in multiprocessing.active_children()], flush=True)
    next(it)
    return 0

sys.modules["blocking_command"] = types.SimpleNamespace(main=main, __doc__="")
cli.COMMANDS["block"] = ("blocking_command", "")
sys.exit(cli.main(["block"]))
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # an orphan's zombie awaits a reaper that may never come: it has ended


def start_blocking(tmp_path) -> tuple[subprocess.Popen, list[int]]:
    proc = subprocess.Popen([sys.executable, "-c", BLOCKING_COMMAND, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    first = proc.stdout.readline().split()
    assert first[:1] == ["workers"], (first, proc.stderr.read() if proc.poll() is not None else "")
    workers = [int(p) for p in first[1:]]
    assert len(workers) == 1 and alive(workers[0])
    time.sleep(0.5)  # the worker is inside the second item
    assert alive(workers[0])
    return proc, workers


def wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    end = time.monotonic() + seconds
    while time.monotonic() < end and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_busy_dataloader_worker_ends_with_its_parent(sig, tmp_path):
    proc, workers = start_blocking(tmp_path)
    try:
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
        assert wait_gone(workers) == [], f"worker {workers} outlived its parent (killed by {sig.name})"
        if sig == signal.SIGTERM:  # a clean exit: one line, 128 + SIGTERM, no traceback
            err = proc.stderr.read()
            assert code == 128 + signal.SIGTERM and "mcad block: terminated (SIGTERM)" in err, err
            assert "Traceback" not in err, err
    finally:
        for p in [proc.pid, *workers]:
            if alive(p):
                os.kill(p, signal.SIGKILL)
        proc.wait()


# -- library noise stays out of the console, and in the log ---------------------------------------------
NOISY_COMMAND = r"""
import sys, types, warnings
from pathlib import Path
from mcad import cli

def main(argv):
    from mcad.checks import STUDENT, require_counts
    from mcad.config import load_command_config
    from mcad.distill.teachers import add_file_log

    add_file_log(Path(argv[0]))  # a run's log, as the training commands keep one
    import faiss, torch, torchao  # noqa: F401  (they log and warn as they load)
    import mcad.checks
    warnings.warn_explicit("a library's own warning", UserWarning, torch.__file__, 1)
    warnings.warn_explicit("an mcad warning", UserWarning, mcad.checks.__file__, 1)
    require_counts(load_command_config(["flickr30k", "steps=20"], "student"), STUDENT)
    return 0

sys.modules["noisy_command"] = types.SimpleNamespace(main=main, __doc__="")
cli.COMMANDS["noisy"] = ("noisy_command", "")
sys.exit(cli.main(["noisy", sys.argv[1]]))
"""
NOISE = ("torchao", "faiss", "triton", "_pytree", "Enum subclass", "a library's own warning")


def test_library_noise_goes_to_the_log_not_the_console(tmp_path):
    log = tmp_path / "run.log"
    proc = subprocess.run([sys.executable, "-c", NOISY_COMMAND, str(log)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    kept = log.read_text()
    # the libraries did speak (this environment's torchao, faiss and torch do): into the log
    heard = [n for n in NOISE if n in kept]
    assert "faiss" in heard and "a library's own warning" in heard and len(heard) >= 4, kept
    assert [n for n in heard if n in proc.stderr] == [], proc.stderr
    # mcad's own warnings still reach the console (and the log)
    for own in ("warmup=300 is not below steps=20", "an mcad warning"):
        assert own in proc.stderr and own in kept, proc.stderr


def test_teachers_refuse_one_file_for_train_and_test(tmp_path):
    """`mcad teachers data=all.csv` would train on the rows it then reports as test metrics: refused
    in one line naming the file and the per-split fix, before the run folder is made."""
    from mcad.distill.teachers import main as teachers_main

    csv = tmp_path / "all.csv"
    csv.write_text("filepath,caption\na.png,a red circle\n")
    out = tmp_path / "teachers"
    with pytest.raises(ValueError, match=r"data\.csv=.*all\.csv: one file serves every split.*data\.csv=\{train"):
        teachers_main([f"data={csv}", f"out={out}"])
    assert not out.exists()


def test_library_records_reach_the_log_once(tmp_path):
    """A library's own handler forwards its records to the run's log; a root handler that forwards
    too (a library's handler put on the root, or a log handler whose stream is no longer the console)
    must not hand the record back: one line in the log, no recursion."""
    import io

    from mcad.cli import LibraryNoise

    root, lib = logging.getLogger(), logging.getLogger("somelib.worker")
    log_buf, loop_buf = io.StringIO(), io.StringIO()
    run_log, looping = logging.StreamHandler(log_buf), logging.StreamHandler(loop_buf)
    looping.addFilter(LibraryNoise(forward=True))
    own = logging.StreamHandler(io.StringIO())
    own.addFilter(LibraryNoise(forward=True))
    lib.addHandler(own)
    lib.propagate = False
    for h in (run_log, looping):
        root.addHandler(h)
    try:
        lib.warning("probe %d", 7)
    finally:
        for h in (run_log, looping):
            root.removeHandler(h)
        lib.removeHandler(own)
        lib.propagate = True
    assert log_buf.getvalue().count("probe 7") == 1 and loop_buf.getvalue() == ""


def test_student_refuses_one_file_for_its_pairs_and_test(tmp_path):
    """A student that trains on labelled pairs and reports test metrics from the same single file
    would score its training rows: refused in one line before anything loads."""
    from mcad.distill.recipe import StudentRecipe

    csv = tmp_path / "all.csv"
    csv.write_text("filepath,caption\na.png,a red circle\n")
    cfg = load_command_config([f"data={csv}", f"out={tmp_path / 'runs'}"], "student",
                              shorthands={"data": data_spec.shorthand})
    with pytest.raises(ValueError, match=r"data\.csv=.*all\.csv: one file serves every split, so the test metrics"):
        StudentRecipe(cfg, progress=False)



def test_commands_without_a_run_folder_keep_library_records_in_their_log(tmp_path, monkeypatch, capsys):
    """A library's warning during a command with no run log (export, index, search...) is kept from
    the console but written to the command's own log under the mcad cache, not dropped."""
    from mcad.cli import main

    monkeypatch.setenv("MCAD_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["search", "--help"]) == 0
    logging.getLogger("somelib.loader").warning("probe %s", "kept")
    capsys.readouterr()
    log = tmp_path / "cache" / "logs" / "search.log"
    assert "somelib.loader: probe kept" in log.read_text()
    logging.getLogger("somelib.loader").warning("second probe")
    assert "second probe" not in capsys.readouterr().err
