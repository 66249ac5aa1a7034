"""The hosted-CI + phone workflow parses, and every make call in it is a Makefile target with the
variables that target reads (it is not run here: no network, no phone)."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "device-bench.yml"


def _targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {m.group(1) for m in re.finditer(r"^([a-z][\w-]*):", text, re.M)}


def _runs(job: dict) -> list[str]:
    return [s["run"] for s in job["steps"] if "run" in s]


def test_workflow_parses_and_calls_the_make_targets():
    wf = yaml.safe_load(WORKFLOW.read_text())
    jobs = wf["jobs"]
    assert set(jobs) == {"build", "phone", "qaihub"}
    targets = _targets()
    for name, job in jobs.items():
        for run in _runs(job):
            for call in re.findall(r"\bmake ([\w-]+)", run):
                assert call in targets, f"{name}: make {call} is not a Makefile target"
    assert _runs(jobs["build"]) == ["bash .ci/run"]  # the same script this project's CI runs
    phone = " ".join(_runs(jobs["phone"]))
    assert "self-hosted" in jobs["phone"]["runs-on"] and jobs["phone"]["needs"] == "build"
    assert "make export TARGET=snapdragon" in phone and "make bench DEVICE=$SERIAL" in phone
    uploads = [s for s in jobs["phone"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    assert uploads and "bench/" in uploads[0]["with"]["path"] and uploads[0]["if"] == "always()"
    hub = " ".join(_runs(jobs["qaihub"]))
    assert "HUB=1" in hub and 'DEVICE="qaihub:' in hub and "qai-hub configure" in hub


def test_ci_script_runs_what_a_user_runs():
    ci = "\n".join(ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if not ln.lstrip().startswith("#"))
    order = [ci.index(s) for s in ("make install", "make test", "make student", "make export TARGET=$target",
                                   "make gate")]
    assert order == sorted(order)
    assert "for target in cpu snapdragon dimensity" in ci
