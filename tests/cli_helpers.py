"""Driving the `mcad` CLI from a test: its exit code and one-line errors, and a fake command that
brings a fault from deep inside a command to the top-level handler."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import types
from pathlib import Path


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """(exit code, the `mcad ...` lines on stderr, stdout); a traceback fails the test."""
    from mcad.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, [ln for ln in err.splitlines() if ln.startswith("mcad ")], out


def fake_command(monkeypatch, main) -> None:
    """`mcad fake` runs `main`."""
    from mcad import cli

    monkeypatch.setitem(sys.modules, "fake_mcad_command", types.SimpleNamespace(main=main, __doc__="fake"))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_mcad_command", ""))


def hold_lock(folder: Path, command: str) -> subprocess.Popen:
    """Another process holding a run folder, as a running `mcad <command>` does."""
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from mcad.runs import run_folder_lock\n"
        f"with run_folder_lock({str(folder)!r}, {command!r}):\n"
        "    print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


@contextlib.contextmanager
def held_lock(folder: Path, command: str):
    """hold_lock for the block: the holder (its Popen) is killed when the block ends."""
    holder = hold_lock(folder, command)
    try:
        yield holder
    finally:
        holder.kill()
        holder.wait()
