"""`mcad export target=cpu|snapdragon|dimensity [run=runs/<name>] [strict=1] [hub=1] [soc=SM8650]
[calib=256] [keep_fp32=proj,softmax] [precision=int8|fp32] [data=data/synth] [parity=1]`

Writes runs/<name>/export/<target>/ (see mcad.export.pipeline), prints the parity table and
exits 1 when an artifact misses a bar. Bad input is one line on stderr."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from mcad.config import CONFIG_DIR, load_config, parse_value

log = logging.getLogger("mcad.export")

KEYS = {"target", "run", "data", "out", "calib", "strict", "hub", "soc", "keep_fp32", "precision", "parity",
        "parity_images", "queries", "max_gallery", "fixed_gallery", "backends", "roles", "seed", "progress"}


def parse_args(argv: list[str]) -> dict:
    path = CONFIG_DIR / "export.yaml"
    cfg = dict(load_config(path)) if path.exists() else {}
    for item in argv:
        if item in ("-h", "--help"):
            raise SystemExit(print(__doc__) or 0)
        if "=" not in item:
            if item in ("cpu", "snapdragon", "dimensity"):
                cfg["target"] = item
                continue
            raise ValueError(f"{item!r}: expected key=value (keys: {', '.join(sorted(KEYS))})")
        key, value = item.split("=", 1)
        key = key.strip().lower()
        if key not in KEYS:
            raise ValueError(f"{key}: unknown option (keys: {', '.join(sorted(KEYS))})")
        cfg[key] = parse_value(value) if value != "" else None
    return cfg


def options(cfg: dict):
    from mcad.export.pipeline import Options, TARGETS

    target = str(cfg.get("target") or "cpu").lower()
    if target not in TARGETS:
        raise ValueError(f"target={target}: unknown target (one of {', '.join(TARGETS)})")
    def tup(v):
        if v is None:
            return None
        return tuple(b for b in v.split(",") if b) if isinstance(v, str) else tuple(str(b) for b in v)

    backends, roles = tup(cfg.get("backends")), tup(cfg.get("roles"))
    o = Options(
        target=target,
        run=cfg.get("run"),
        data=cfg.get("data"),
        out=cfg.get("out"),
        calib=int(cfg.get("calib", 256)),
        strict=bool(cfg.get("strict", False)),
        hub=bool(cfg.get("hub", False)),
        soc=None if cfg.get("soc") is None else str(cfg["soc"]),
        keep_fp32=cfg.get("keep_fp32"),
        precision=str(cfg.get("precision", "int8")),
        parity=bool(cfg.get("parity", True)),
        parity_images=int(cfg.get("parity_images", 0) or 0),
        queries=int(cfg.get("queries", 16)),
        max_gallery=int(cfg.get("max_gallery", 100_000)),
        fixed_gallery=int(cfg.get("fixed_gallery", 1000)),
        backends=backends or None,
        roles=roles or ("text", "image", "search"),
        seed=int(cfg.get("seed", 0)),
        progress=bool(cfg.get("progress", True)),
    )
    if o.calib < 1:
        raise ValueError(f"calib={o.calib}: need at least one calibration sample")
    return o


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
    from mcad.export.pipeline import export

    manifest = export(opts)
    out = Path(manifest["run"]) / "export" / opts.target if opts.out is None else Path(opts.out)
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
