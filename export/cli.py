"""`mcad export target=cpu|snapdragon|dimensity [run=runs/<name>] [strict=1] [hub=1] [soc=SM8650]
[calib=256] [keep_fp32=proj,softmax] [precision=int8|fp32] [data=<default: the run's own>] [parity=1]
[gallery=<.npy of unit rows | random:N> [bound_dtype=int8|fp32]] [any_gallery_search=1]`

Every key is a field of mcad.export.options.Options (its defaults, with mcad/configs/export.yaml's
over them; checked when the options are made). Writes runs/<name>/export/<target>/ (<target>-bound/
with gallery=: search programs holding that gallery, mcad.export.bound), prints the parity table and
exits 1 when an artifact misses a bar. Bad input is one line on stderr."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from mcad.config import CONFIG_DIR, ConfigError, parse_overrides, read_yaml
from mcad.export.backends import TARGETS

log = logging.getLogger("mcad.export")


def defaults():
    """The export defaults: `Options`' fields (the one place they are written), with
    mcad/configs/export.yaml's recipe values over them."""
    import dataclasses

    from mcad.export.options import Options

    path = CONFIG_DIR / "export.yaml"
    recipe = read_yaml(path) if path.exists() else {}
    fields = {f.name for f in dataclasses.fields(Options)}
    for k in recipe:
        if k not in fields:
            raise ConfigError(f"{path}: {k}: not an export option (options: {', '.join(sorted(fields))})")
    return dataclasses.replace(Options(), **recipe)


def parse_args(argv: list[str]) -> dict:
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        raise SystemExit(print(__doc__) or 0)
    # keys are case-insensitive (`TARGET=cpu` from a Makefile variable)
    argv = [a.split("=", 1)[0].lower() + "=" + a.split("=", 1)[1] if "=" in a else a for a in argv]
    p = parse_overrides(argv, defaults(), positional=1)
    cfg = p.config
    if p.positional:  # a bare target name is `target=` (`mcad export cpu`)
        if p.positional[0] not in TARGETS:
            raise ValueError(f"{p.positional[0]!r}: expected key=value or a target ({', '.join(TARGETS)})")
        cfg["target"] = p.positional[0]
    return cfg


def options(cfg: dict):
    """The checked Options of parsed `key=value` arguments (bad values: one line)."""
    from mcad.export.options import Options

    return Options(**cfg)


def _quiet_other_loggers() -> None:
    """Exporters (JAX lowering, onnx_ir, absl) log every step at INFO; keep ours and their warnings."""
    def keep(record: logging.LogRecord) -> bool:
        return record.name.startswith("mcad") or record.levelno >= logging.WARNING

    for h in logging.getLogger().handlers:
        h.addFilter(keep)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_other_loggers()
    opts = options(parse_args(argv))
    from mcad.export.parity import table
    from mcad.export.pipeline import default_out, export

    manifest = export(opts)
    out = default_out(Path(manifest["run"]), opts) if opts.out is None else Path(opts.out)
    print(f"wrote {out}/ ({len(manifest['artifacts'])} artifacts)")
    for a in manifest["artifacts"]:
        print(f"  {a['file']:<44} {a['backend']:<8} {a['runtime']:<12} {a['bytes'] / 1024:8.1f} KiB")
    reasons: dict[str, list[str]] = {}
    for s in manifest["skipped"]:
        reasons.setdefault(s["reason"], []).append(s["artifact"])
    for reason, names in reasons.items():  # one message per cause
        print(f"skipped {', '.join(names)}: {reason}")
    if manifest["parity"] is None:
        return 0
    print(table(manifest["parity"]))
    return 0 if manifest["parity"]["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
