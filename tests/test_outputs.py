"""Outputs are regular files the tool owns, one writer per folder (mcad.io)."""
from __future__ import annotations

import os
import socket

import pytest

from mcad.io import FolderBusy, OutputRefused, folder_lock, output_target, write_json


def test_a_fifo_a_socket_a_device_and_a_folder_are_refused_and_left_as_they_are(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))
    try:
        for path, kind in ((fifo, "a FIFO"), (sock, "a socket"), (tmp_path, "a folder")):
            with pytest.raises(OutputRefused, match=kind):
                write_json(path, {"x": 1})
        assert fifo.is_fifo() and sock.is_socket()
        with pytest.raises(OutputRefused, match="a device"):  # asked of the check alone: a failing write would replace it
            output_target("/dev/null")
    finally:
        s.close()
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_symlink_is_refused_unless_asked_to_follow(tmp_path, monkeypatch):
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with pytest.raises(OutputRefused, match="is a symlink.*MCAD_FOLLOW_SYMLINKS=1"):
        write_json(link, {"x": 1})
    assert link.is_symlink() and target.read_text() == "old"
    monkeypatch.setenv("MCAD_FOLLOW_SYMLINKS", "1")
    write_json(link, {"x": 1})
    assert link.is_symlink() and '"x": 1' in target.read_text()


def test_one_writer_per_folder_names_the_holder(tmp_path):
    from cli_helpers import held_lock

    with held_lock(tmp_path, "student") as holder:
        with pytest.raises(FolderBusy, match=rf"mcad student \(pid {holder.pid}\) is writing this folder"):
            with folder_lock(tmp_path, "student"):
                pass
    with folder_lock(tmp_path, "student"):  # a killed holder leaves the folder free
        pass


def test_log_files_are_regular_files_the_tool_owns(tmp_path, monkeypatch):
    """A run's log planted as a symlink is refused in one line (not followed, the target untouched);
    the command log at such a path is left alone and the command goes on without it."""
    import logging

    from mcad.cli import command_log
    from mcad.io import OutputRefused
    from mcad.logs import add_file_log

    target = tmp_path / "elsewhere.txt"
    target.write_text("user's\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").symlink_to(target)
    with pytest.raises(OutputRefused, match=r"train\.log: is a symlink"):
        add_file_log(run / "train.log")
    monkeypatch.setenv("MCAD_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache" / "logs").mkdir(parents=True)
    (tmp_path / "cache" / "logs" / "search.log").symlink_to(target)
    assert command_log("search") is None
    logging.getLogger("somelib").warning("not into the user's file")
    assert target.read_text() == "user's\n"
