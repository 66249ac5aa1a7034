"""Driving the `mcad` CLI from a test: its exit code and one-line errors, and a fake command that
brings a fault from deep inside a command to the top-level handler."""
from __future__ import annotations

import sys
import types


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
