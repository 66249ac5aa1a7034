"""The built wheel, not the editable checkout: it carries every module and the YAML configs (the
model registry's mcad/models/configs/, the recipes in mcad/configs/, the bench budgets), and an
installed copy finds its models and recipes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import json, mcad, mcad.config, mcad.models.registry as registry
from mcad.benchmarks.budgets import BUDGETS_FILE
print(json.dumps({"file": mcad.__file__, "models": registry.list_models(),
                  "student_steps": mcad.config.load_config("student")["steps"], "budgets": BUDGETS_FILE.is_file()}))
"""


def _package_dirs() -> dict[str, Path]:
    """distribution package -> its source folder, as pyproject.toml maps them"""
    st = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    out = {}
    for pkg in st["packages"]:
        top = max((k for k in st["package-dir"] if pkg == k or pkg.startswith(k + ".")), key=len)
        out[pkg] = REPO / st["package-dir"][top] / Path(*pkg[len(top):].lstrip(".").split(".") if pkg != top else ())
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the sources (the build writes build/ and *.egg-info where it runs);
    a few seconds, so not marked slow."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, src / f)
    st = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "results", "*.egg-info")
    for folder in set(st["package-dir"].values()):
        shutil.copytree(REPO / folder, src / folder, ignore=skip)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp / "dist"), str(src)], cwd=tmp, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = (tmp / "dist").glob("mcad-*.whl")
    return whl


def test_wheel_carries_modules_and_yaml_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg, folder in _package_dirs().items():
        inside = pkg.replace(".", "/")
        for f in [*folder.glob("*.py"), *folder.glob("*.yaml")]:
            assert f"{inside}/{f.name}" in names, f"{f.relative_to(REPO)} is not in the wheel"
    models = sorted((REPO / "mcad" / "models" / "configs").glob("*.yaml"))
    recipes = sorted((REPO / "mcad" / "configs").glob("*.yaml"))
    assert models and recipes
    for f in models:
        assert f"mcad/models/configs/{f.name}" in names
    for f in recipes:
        assert f"mcad/configs/{f.name}" in names
    assert "mcad/benchmarks/budgets.yaml" in names


def test_installed_wheel_has_a_model_registry(wheel, tmp_path):
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = tmp_path / "elsewhere"  # outside the checkout: nothing resolves against the repo
    run.mkdir()
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=run, env={**env, "PYTHONPATH": str(site)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(site.resolve()), got["file"]  # not the editable checkout
    assert got["models"] == sorted(p.stem for p in (REPO / "mcad" / "models" / "configs").glob("*.yaml"))
    assert "student-tiny" in got["models"] and got["student_steps"] > 0 and got["budgets"]


def test_wheel_holds_no_study_recipe_of_a_study_or_test_fixture(wheel):
    """The product only: the studies and their recipes (benchmarks/studies/) and the suite's
    fixtures (tests/) stay in the checkout."""
    names = set(zipfile.ZipFile(wheel).namelist())
    studies = REPO / "benchmarks" / "studies"
    left_out = [*studies.rglob("*.py"), *studies.rglob("*.yaml"), *(REPO / "tests").glob("*.py")]
    assert left_out
    shipped = {n.rsplit("/", 1)[-1] for n in names if n.startswith("mcad/")}
    inside = [f.relative_to(REPO) for f in left_out if f.name in shipped and f.name not in ("__init__.py",)]
    assert not inside, f"in the wheel: {inside}"
    assert not [n for n in names if "/studies/" in n or n.startswith("tests/")]
