"""One config layer for every command: unknown keys and wrong types are refused with one line
naming the key (and the nearest valid one), before any work is done."""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from mcad.config import ConfigError, apply_overrides, load_config, parse_overrides

# command -> (argv with a typo'd key, the suggestion, argv with a wrong type, the key named).
# Every command of mcad.cli.COMMANDS takes key=value, so every one must be listed here.
CASES: dict[str, tuple[list[str], str, list[str], str]] = {
    "data": (["n_tset=4"], "n_test", ["n_test=abc"], "n_test"),
    "teachers": (["dual.stpes=2"], "dual.steps", ["dual.steps=abc"], "dual.steps"),
    "eval": (["x.safetensors", "fusoin=f.safetensors"], "fusion", ["x.safetensors", "k=abc"], "k"),
    "cache": (["neighbors=3"], "neighbours", ["neighbours=abc"], "neighbours"),
    "student": (["stpes=2"], "steps", ["steps=abc"], "steps"),
    "ablation": (["seds=0,1"], "seeds", ["steps=abc"], "steps"),
    "export": (["cpu", "calbi=8"], "calib", ["cpu", "calib=abc"], "calib"),
    "bench": (["galeries=1000"], "galleries", ["k=abc"], "k"),
    "index": (["batchh=8"], "batch", ["batch=abc"], "batch"),
    "search": (["a red circle", "indx=idx"], "index", ["a red circle", "k=abc"], "k"),
    "report": (["queris=2"], "queries", ["queries=abc"], "queries"),
}


def _command(name: str):
    """the module behind `mcad <name>`, wherever its stage keeps it (mcad.cli.COMMANDS)"""
    import importlib

    from mcad.cli import COMMANDS

    return importlib.import_module(COMMANDS[name][0])


def _cli(argv, capsys, monkeypatch, tmp_path) -> tuple[int, list[str]]:
    from mcad.cli import main

    monkeypatch.chdir(tmp_path)  # nothing of the checkout (runs/, data/) is found or written
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_every_command_has_a_case():
    from mcad.cli import COMMANDS

    assert set(CASES) == set(COMMANDS)


@pytest.mark.parametrize("cmd", sorted(CASES))
def test_typo_key_is_refused_with_the_nearest_key(cmd, capsys, monkeypatch, tmp_path):
    argv, near, _, _ = CASES[cmd]
    typo = next(a for a in argv if "=" in a).split("=")[0]
    code, err = _cli([cmd, *argv], capsys, monkeypatch, tmp_path)
    assert code == 1 and err == [f"mcad {cmd}: error: {typo}: unknown key; did you mean {near}?"], err


@pytest.mark.parametrize("cmd", sorted(CASES))
def test_wrong_type_is_refused_naming_the_key(cmd, capsys, monkeypatch, tmp_path):
    _, _, argv, key = CASES[cmd]
    code, err = _cli([cmd, *argv], capsys, monkeypatch, tmp_path)
    assert code == 1 and err == [f"mcad {cmd}: error: {key}: expected an int, got 'abc'"], err


def test_data_check_keys_are_checked(capsys, monkeypatch, tmp_path):
    code, err = _cli(["data", "check", "fromat=csv"], capsys, monkeypatch, tmp_path)
    assert code == 1 and err == ["mcad data: error: fromat: unknown key; did you mean format?"]
    code, err = _cli(["data", "check", "decode=maybe"], capsys, monkeypatch, tmp_path)
    assert code == 1 and err == ["mcad data: error: decode: expected a bool (true/false), got 'maybe'"]


def test_student_dotted_keys_and_recipe_positional(capsys, monkeypatch, tmp_path):
    code, err = _cli(["student", "loss.alpah=1"], capsys, monkeypatch, tmp_path)
    assert err == ["mcad student: error: loss.alpah: unknown key; did you mean loss.alpha?"]
    code, err = _cli(["student", "loss=1"], capsys, monkeypatch, tmp_path)
    assert code == 1 and len(err) == 1 and "loss: a mapping" in err[0]
    code, err = _cli(["student", "student", "extra"], capsys, monkeypatch, tmp_path)
    assert code == 1 and len(err) == 1 and "one recipe at most" in err[0]
    code, err = _cli(["student", "nosuchrecipe"], capsys, monkeypatch, tmp_path)
    assert code == 1 and "no such config file or registered recipe" in err[0]


def test_benchmark_scripts_use_the_same_parser(capsys):
    import search_bench

    with pytest.raises(ConfigError, match=r"^typs: unknown key; did you mean types\?$"):
        search_bench.parse_args(["typs=flat"])
    with pytest.raises(ConfigError, match=r"^n: expected an int, got 'abc'$"):
        search_bench.parse_args(["n=abc"])
    assert search_bench.main(["nn=5"]) == 2
    assert "search_bench: error: nn: unknown key; did you mean n?" in capsys.readouterr().err
    o = search_bench.parse_args(["n=1e5", "run=007"])
    assert o["n"] == 100_000 and o["run"] == "007" and o["out"] == "benchmarks/results"


# -- the parser itself ---------------------------------------------------------------------------------
DEFAULTS = {"steps": 1500, "lr": 2e-3, "name": "run", "bf16": False, "threads": [1, 2], "cache": None,
            "roles": ("text", "image"), "loss": {"alpha": 20.0, "within": "split"}}


@pytest.mark.parametrize("item, expect", [
    ("steps=200", {"steps": 200}), ("steps=1e3", {"steps": 1000}), ("lr=1e-3", {"lr": 0.001}),
    ("lr=1", {"lr": 1.0}), ("name=007", {"name": "007"}), ("bf16=1", {"bf16": True}),
    ("bf16=false", {"bf16": False}), ("threads=1,4", {"threads": [1, 4]}), ("threads=[3]", {"threads": [3]}),
    ("cache=runs/x/cache", {"cache": "runs/x/cache"}), ("cache=", {"cache": None}), ("cache=[1, 2]", {"cache": [1, 2]}),
    ("roles=text", {"roles": ("text",)}), ("loss.alpha=1", {"loss.alpha": 1.0}),
])
def test_values_take_their_defaults_type(item, expect):
    assert parse_overrides([item], DEFAULTS).given == expect


@pytest.mark.parametrize("item, message", [
    ("stpes=2", "stpes: unknown key; did you mean steps?"),
    ("steps=abc", "steps: expected an int, got 'abc'"),
    ("steps=2.5", "steps: expected an int, got '2.5'"),
    ("steps=true", "steps: expected an int, got 'true'"),
    ("lr=fast", "lr: expected a number, got 'fast'"),
    ("bf16=maybe", "bf16: expected a bool (true/false), got 'maybe'"),
    ("threads=1,a", "threads: expected a list of ints, got '1,a'"),
    ("loss.alpah=1", "loss.alpah: unknown key; did you mean loss.alpha?"),
    ("loss.within.x=1", "loss.within: not a mapping, so loss.within.x cannot be set (set loss.within=...)"),
    ("xyzzy=1", "xyzzy: unknown key (valid: steps, lr, name, bf16, threads, cache, roles, loss)"),
])
def test_bad_overrides_are_one_line(item, message):
    with pytest.raises(ConfigError) as e:
        parse_overrides([item], DEFAULTS)
    assert str(e.value) == message


def test_positionals_flags_and_given():
    p = parse_overrides(["a query", "steps=3", "--json"], DEFAULTS, positional=1, flags=("json",))
    assert p.positional == ["a query"] and p.flags == {"json"} and p.given == {"steps": 3}
    assert p.config["steps"] == 3 and p.config["lr"] == DEFAULTS["lr"]
    with pytest.raises(ConfigError, match="too many positional"):
        parse_overrides(["a", "b"], DEFAULTS, positional=1)
    with pytest.raises(ConfigError, match=r"^'a': expected key=value$"):
        parse_overrides(["a"], DEFAULTS)
    with pytest.raises(ConfigError, match=r"^--jsno: unknown flag; did you mean --json\?$"):
        parse_overrides(["--jsno"], DEFAULTS, flags=("json",))


def test_open_mappings_take_free_keys_and_nothing_else_does():
    d = {"model": {"width": 64}, "extra": None}
    cfg = apply_overrides(d, ["extra.a.b=1", "extra.name=x", "model.width=32"], open_keys=["extra"])
    assert cfg == {"model": {"width": 32}, "extra": {"a": {"b": 1}, "name": "x"}}
    with pytest.raises(ConfigError, match="model.depth: unknown key"):
        apply_overrides(d, ["model.depth=2"], open_keys=["extra"])
    assert d == {"model": {"width": 64}, "extra": None}  # the defaults are not changed


def test_types_for_none_defaults_and_dataclasses():
    @dataclasses.dataclass
    class Opts:
        run: str | None = None
        calib: int = 256
        roles: tuple[str, ...] = ("text", "image")
        backends: tuple[str, ...] | None = None
        keep: Any = None

    p = parse_overrides(["run=007", "roles=text", "backends=a,b", "keep=[proj]"], Opts)
    assert p.config == {"run": "007", "calib": 256, "roles": ("text",), "backends": ("a", "b"), "keep": ["proj"]}
    with pytest.raises(ConfigError, match=r"^calib: expected an int, got 'x'$"):
        parse_overrides(["calib=x"], Opts)
    assert parse_overrides(["calib=8"], Opts(calib=4)).config["calib"] == 8  # an instance's values are the defaults
    assert parse_overrides(["runs=5"], {"runs": None}, types={"runs": int}).config == {"runs": 5}
    with pytest.raises(ConfigError, match=r"^runs: expected an int, got 'x'$"):
        parse_overrides(["runs=x"], {"runs": None}, types={"runs": int})


def test_load_config_is_strict_against_the_recipe():
    cfg = load_config("student", ["steps=2", "loss.alpha=1"])
    assert cfg["steps"] == 2 and cfg["loss"]["alpha"] == 1.0
    with pytest.raises(ConfigError, match="did you mean steps"):
        load_config("student", ["stpes=2"])
    assert load_config("student", ["seeds=0,1"], extra={"seeds": "0"})["seeds"] == "0,1"


def test_export_defaults_come_from_the_options_dataclass():
    from mcad.config import read_yaml
    from mcad.export.cli import defaults, options, parse_args
    from mcad.export.pipeline import Options

    d, recipe = defaults(), read_yaml("export")
    for f in dataclasses.fields(Options):
        want = recipe[f.name] if f.name in recipe else getattr(Options(), f.name)
        assert getattr(d, f.name) == want, f.name
    o = options(parse_args(["snapdragon", "strict=1", "roles=text,image", "keep_fp32=proj,softmax", "calib=8"]))
    assert (o.target, o.strict, o.roles, o.keep_fp32, o.calib) == ("snapdragon", True, ("text", "image"),
                                                                    "proj,softmax", 8)
    assert options(parse_args(["TARGET=dimensity"])).target == "dimensity"


def test_bench_options_keep_their_quick_defaults():
    parse_args = _command("bench").parse_args

    q = parse_args(["quick=1", "--min-time=0.5", "keep=1", "timeout=3"])
    assert q.threads == [1] and q.galleries == [1000] and q.peers == "none" and q.results is None
    assert q.timing.min_time_s == 0.5 and q.device_options == {"keep": True, "timeout_s": 3.0}
    f = parse_args(["runs/x", "threads=1,2", "results=out/res"])
    assert str(f.run) == "runs/x" and f.threads == [1, 2] and f.peers == "full" and str(f.results) == "out/res"
    with pytest.raises(ValueError, match="threads=0: must be a positive integer"):
        parse_args(["threads=0"])


def test_results_go_to_the_working_checkout_not_the_package(monkeypatch, tmp_path):
    """bench and search_bench write their summaries under ./benchmarks/results of where they run
    (or where results=/out= says), never beside the installed mcad/benchmarks modules."""
    import mcad.benchmarks
    import search_bench
    from mcad.benchmarks.engine import BenchOptions
    parse_args = _command("bench").parse_args

    monkeypatch.chdir(tmp_path)
    package = mcad.benchmarks.__file__.rsplit("/", 1)[0]
    for path in (parse_args([]).results, BenchOptions().results, search_bench.parse_args([])["out"]):
        assert str(path) == "benchmarks/results" and not str(path).startswith(package)
        assert (tmp_path / path).resolve() == (tmp_path / "benchmarks" / "results").resolve()
    assert str(parse_args(["results=elsewhere"]).results) == "elsewhere" and parse_args(["quick=1"]).results is None


def test_model_takes_a_name_or_a_mapping_on_the_command_line(tmp_path):
    """`model=` is a registry name or a whole shape: a YAML mapping on the command line as in a
    recipe, and a name over a recipe's mapping; a mapping that does not parse is one line."""
    from mcad.config import ConfigError, load_command_config

    shape = "model={type: clip, text: {layers: 2, width: 64}, embed_dim: 32}"
    cfg = load_command_config([shape], "student")
    assert cfg["model"] == {"type": "clip", "text": {"layers": 2, "width": 64}, "embed_dim": 32}
    assert load_command_config(["model=student-mobile"], "student")["model"] == "student-mobile"
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("base: student\nmodel: {type: clip, text: {layers: 2}}\n")
    assert load_command_config([str(recipe), "model=student-tiny"], "student")["model"] == "student-tiny"
    with pytest.raises(ConfigError, match=r"^model: '\{type: clip' is not a YAML mapping"):
        load_command_config(["model={type: clip"], "student")
