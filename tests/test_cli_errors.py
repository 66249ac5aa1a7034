"""Every failure of the CLI is one line naming the file or key and the fix, and nothing of the
user's is replaced: outputs that are not regular files, one writer per run folder, OS errors (disk
full, permissions) and library errors, and inputs checked before any work."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from cli_helpers import fake_command, held_lock, run_cli


@pytest.fixture
def five_images(synth_root, tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for p in sorted((synth_root / "images").glob("test_*.png"))[:5]:
        shutil.copy(p, d / p.name)
    return d


# -- 1. a user's files are not replaced ---------------------------------------------------------------
def test_json_to_a_fifo_a_symlink_or_a_device_is_refused_before_any_work(tmp_path, capsys):
    missing = str(tmp_path / "no-such.safetensors")  # refused before the checkpoint is even looked at
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    code, err, _ = run_cli(["eval", missing, f"json={fifo}"], capsys)
    assert code == 1 and len(err) == 1 and f"json={fifo}" in err[0] and "is a FIFO" in err[0], err
    assert fifo.is_fifo()
    mine = tmp_path / "mine.json"
    mine.write_text("mine")
    link = tmp_path / "link.json"
    link.symlink_to(mine)
    code, err, _ = run_cli(["eval", missing, f"json={link}"], capsys)
    assert code == 1 and len(err) == 1 and "is a symlink" in err[0] and "MCAD_FOLLOW_SYMLINKS=1" in err[0], err
    assert link.is_symlink() and mine.read_text() == "mine"
    dev = tmp_path / "null"
    try:  # a device node of our own (the null device) in the test's folder: no real device is touched
        os.mknod(dev, 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot make a device node here")
    code, err, _ = run_cli(["eval", missing, f"json={dev}"], capsys)
    assert code == 1 and len(err) == 1 and "is a device" in err[0], err
    assert dev.is_char_device()


# -- one writer per run folder ---------------------------------------------------------------------------
def test_a_second_teachers_run_into_the_same_folder_is_refused(synth_root, tmp_path, capsys):
    out = tmp_path / "teachers"
    with held_lock(out, "teachers") as holder:
        code, err, _ = run_cli(["teachers", f"data={synth_root}", f"out={out}", "dual.steps=2", "fusion.steps=2"], capsys)
    assert code == 1 and err == [f"mcad teachers: error: {out}: mcad teachers (pid {holder.pid}) is writing this "
                                 f"folder; wait for it to end or give another folder (one writer per folder)"], err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written beside the holder's lock


def test_a_second_student_run_into_the_same_folder_is_refused(synth_root, tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    # refused before the teachers are looked for (there are none: a run that got further fails on them)
    with held_lock(run, "student") as holder:
        code, err, _ = run_cli(["student", f"data={synth_root}", f"teachers={tmp_path / 'no-teachers'}",
                                f"out={tmp_path / 'runs'}", "name=x", "steps=2"], capsys)
    assert code == 1 and len(err) == 1 and f"mcad student (pid {holder.pid}) is writing this folder" in err[0], err
    assert sorted(p.name for p in run.iterdir()) == [".lock"]


def test_the_other_ranks_of_a_torchrun_job_write_under_rank_0s_lock(tmp_path, monkeypatch):
    from mcad.io import FolderBusy
    from mcad.runs import run_folder_lock

    with held_lock(tmp_path, "student") as holder:  # rank 0 of the job
        monkeypatch.setenv("RANK", "1")
        with run_folder_lock(tmp_path, "student"):
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(FolderBusy, match=f"pid {holder.pid}"):
            with run_folder_lock(tmp_path, "student"):
                pass


@pytest.mark.parametrize("name, why", [("../../x", "leaves out="), ("", "empty"), ("/tmp/x", "leaves out=")])
def test_a_run_name_outside_out_or_empty_is_refused(name, why, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "a" / "b"
    code, err, _ = run_cli(["student", f"out={out}", f"name={name}", "steps=2"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"mcad student: error: name={name}: ") and why in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder made anywhere


def test_a_finished_teachers_run_leaves_no_resume_checkpoint(synth_root, tmp_path, capsys):
    out = tmp_path / "teachers"  # a checkpoint every step: each teacher writes its resume point
    code, err, _ = run_cli(["teachers", f"data={synth_root}", f"out={out}", "dual.steps=2", "fusion.steps=2",
                            "dual.batch_size=16", "fusion.batch_size=8", "dual.ckpt_every=1", "fusion.ckpt_every=1",
                            "threads=1", "eval.rerank_k=4"], capsys)
    assert code == 0 and not err, err
    assert (out / "dual.safetensors").is_file() and (out / "fusion.safetensors").is_file()
    assert not list(out.glob("*.ckpt.pt"))


# -- 3. OS and library errors: one line naming the path and the fix -------------------------------------
@pytest.mark.parametrize("code_, words", [
    (errno.ENOSPC, "no space left on the device"), (errno.EACCES, "permission denied"),
    (errno.EEXIST, "already exists"), (errno.ENOTDIR, "not a folder"), (errno.EROFS, "read-only"),
])
def test_every_os_error_is_one_line_naming_the_path(code_, words, monkeypatch, capsys):
    def main(argv):
        raise OSError(code_, os.strerror(code_), "/data/runs/x/student.safetensors")

    fake_command(monkeypatch, main)
    code, err, _ = run_cli(["fake"], capsys)
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("mcad fake: error: /data/runs/x/student.safetensors: ") and words in err[0], err


def test_library_errors_are_one_line(monkeypatch, capsys, tmp_path):
    import zipfile

    from safetensors import SafetensorError

    for exc in (SafetensorError("Error while deserializing header: HeaderTooLarge"),
                zipfile.BadZipFile("File is not a zip file"), MemoryError()):
        def main(argv, exc=exc):
            raise exc

        fake_command(monkeypatch, main)
        code, err, _ = run_cli(["fake"], capsys)
        assert code == 1 and len(err) == 1 and err[0].startswith("mcad fake: error: "), (exc, err)
        assert type(exc).__name__ in err[0] or "out of memory" in err[0], err


def test_disk_full_while_writing_eval_json_names_the_file(tiny_run, synth_root, tmp_path, capsys, monkeypatch):
    import mcad.io

    class Full:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, data):  # as a real full disk: the write fails, naming no file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(mcad.io, "open", Full, raising=False)
    out = tmp_path / "eval.json"
    code, err, _ = run_cli(["eval", str(tiny_run / "student.safetensors"), f"data={synth_root}", f"json={out}"], capsys)
    assert code == 1 and len(err) == 1 and f"{out}: no space left on the device" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp file, no half-written json


def test_checkpoint_save_on_a_full_disk_names_the_file(tmp_path, monkeypatch, capsys):
    import torch

    from mcad.distill.trainer import Trainer

    def torn(obj, f, *a, **k):  # what torch's zip writer says when the disk fills mid-save
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 2052800 vs 2052688")

    monkeypatch.setattr(torch, "save", torn)
    ckpt = tmp_path / "student.ckpt.pt"
    tr = Trainer({"m": torch.nn.Linear(2, 2)}, {"steps": 1, "lr": 1e-3}, ckpt)
    fake_command(monkeypatch, lambda argv: tr.save())
    code, err, _ = run_cli(["fake"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith(f"mcad fake: error: {ckpt}: ") and "disk" in err[0], err
    assert not ckpt.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_index_out_an_existing_file_is_one_line(tiny_run, five_images, tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    code, err, _ = run_cli(["index", str(five_images), f"out={f}", f"run={tiny_run}", "progress=false"], capsys)
    assert code == 1 and len(err) == 1 and f"out={f}: is a file" in err[0], err
    assert f.read_text() == "mine"


# -- 4. checked before any work, and said precisely ------------------------------------------------------
def test_index_type_too_big_for_the_gallery_is_one_line_before_faiss(tiny_run, five_images, tmp_path, capsys):
    out = tmp_path / "idx"
    code, err, _ = run_cli(["index", str(five_images), f"out={out}", f"run={tiny_run}", "type=ivfpq",
                            "progress=false"], capsys)
    assert code == 1 and len(err) == 1, err
    assert "type=ivfpq: 5 images are too few" in err[0] and "at least 16" in err[0] and "type=flat" in err[0], err
    assert not out.exists()  # not even a folder holding only .lock


def test_a_failed_first_index_leaves_no_folder(tiny_run, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(b"not a png")
    out = tmp_path / "idx"
    code, err, _ = run_cli(["index", str(photos), f"out={out}", f"run={tiny_run}", "progress=false"], capsys)
    assert code == 1 and len(err) == 1 and "could be read" in err[0], err
    assert not out.exists()


def test_help_after_every_subcommand(capsys):
    from mcad.cli import COMMANDS

    for cmd in COMMANDS:
        for flag in ("--help", "-h"):
            code, err, out = run_cli([cmd, "some-positional", "k=1", flag], capsys)
            assert code == 0 and not err, (cmd, flag, err)
            assert out.startswith(f"mcad {cmd}: {COMMANDS[cmd][1]}") and len(out.splitlines()) > 2, (cmd, out[:200])


def test_eval_k_is_checked_before_any_work(tiny_run, synth_root, tmp_path, capsys, monkeypatch):
    import mcad.evaluate

    code, err, _ = run_cli(["eval", str(tmp_path / "no-such.safetensors"), "k=0"], capsys)
    assert code == 1 and err == ["mcad eval: error: k=0: must be a positive integer"], err

    def no_work(*a, **k):
        raise AssertionError("evaluated before refusing k=")

    monkeypatch.setattr(mcad.evaluate, "evaluate_dual", no_work)
    code, err, _ = run_cli(["eval", str(tiny_run / "student.safetensors"), f"data={synth_root}", "k=5"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("mcad eval: error: k=5: ") and "fusion" in err[0], err


def test_eval_json_in_a_folder_nothing_can_be_created_in_is_refused_first(tmp_path, capsys):
    code, err, _ = run_cli(["eval", str(tmp_path / "no-such.safetensors"), "json=/proc/nope/x.json"], capsys)
    assert code == 1 and len(err) == 1 and "json=/proc/nope/x.json: cannot be written" in err[0], err


def test_eval_of_a_run_folder_reads_its_own_tokenizer(tiny_run, synth_root, capsys):
    code, err, out = run_cli(["eval", str(tiny_run), f"data={synth_root}"], capsys)
    assert code == 0 and not err, err
    assert f"| {tiny_run.name} | " in out and "t2i R@1" in out, out  # the run's student, with its tokenizer


def test_eval_refuses_a_dual_model_it_would_ignore(tmp_path, capsys):
    code, err, _ = run_cli(["eval", str(tmp_path / "x.safetensors"), "dual=anything.safetensors"], capsys)
    assert code == 1 and len(err) == 1 and err[0].startswith("mcad eval: error: dual=") and "x.safetensors" in err[0], err


@pytest.mark.parametrize("argv, line", [
    (["student", "lr=-1"], "lr=-1: must be a positive number"),
    (["student", "loss.tau_kd=0"], "loss.tau_kd=0: must be a positive number"),
    (["student", "workers=-2"], "workers=-2: must be an integer >= 0"),
    (["teachers", "dual.lr=0"], "dual.lr=0: must be a positive number"),
    (["eval", "x.safetensors", "workers=-2"], "workers=-2: must be an integer >= 0"),
    (["index", "out=x", "batch=0"], "batch=0: must be a positive integer"),
    (["search", "a red circle", "index=x", "k=-1"], "k=-1: must be a positive integer"),
    (["bench", "threads=0,2"], "threads=0,2: must be a positive integer"),
    (["export", "cpu", "calib=-8"], "calib=-8: must be a positive integer"),
    (["data", "web_wrong=1.5"], "web_wrong=1.5: must be between 0 and 1"),
])
def test_numeric_keys_are_range_checked_where_declared(argv, line, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, err, _ = run_cli(argv, capsys)
    assert code == 1 and err == [f"mcad {argv[0]}: error: {line}"], err


def test_every_commands_defaults_are_in_range():
    """The range rules refuse nothing a command or shipped recipe sets by default."""
    import dataclasses

    from mcad.benchmarks.cli import BENCH_OPTIONS
    from mcad.config import CONFIG_DIR, check_ranges, read_yaml
    from mcad.data.cli import GEN_DEFAULTS
    from mcad.evaluate import eval_options
    from mcad.export.cli import defaults as export_defaults
    from mcad.search import index, query, report

    for defaults in (eval_options(), index.OPTIONS, query.OPTIONS, report.OPTIONS, GEN_DEFAULTS, BENCH_OPTIONS,
                     dataclasses.asdict(export_defaults())):
        check_ranges(defaults)
    for recipe in CONFIG_DIR.glob("*.yaml"):
        check_ranges(read_yaml(recipe))


def test_an_empty_eval_split_suggests_a_key_eval_takes(tiny_run, tmp_path, capsys):
    from mcad.data.cli import make_synthetic

    make_synthetic({"out": str(tmp_path / "d"), "seed": 0, "n_train": 8, "n_val": 4, "n_test": 0,
                    "force": True, "progress": False})
    code, err, _ = run_cli(["eval", str(tiny_run), f"data={tmp_path / 'd'}"], capsys)
    assert code == 1 and len(err) == 1 and "split=val" in err[0] and "eval.split" not in err[0], err
