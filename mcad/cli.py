"""`mcad <command> [args] [key=value ...]`: one entry point whose commands mirror the Make targets.

Each command lives in its stage's module as `main(argv) -> int`; this file only dispatches, so a
stage's dependencies (ExecuTorch, LiteRT, faiss...) are imported only when that command runs.
Every failure a user can cause or meet (bad input, a full disk, a missing permission, a damaged
file a library refuses) ends as one line on stderr and exit 1 (`MCAD_DEBUG=1` shows the traceback);
only a bug in mcad itself still shows a traceback. SIGTERM ends a command as cleanly as its end does
(exit 143, one line). The console shows mcad's own log lines and any error; what libraries log and
warn goes only to the logs: the run's (a run folder's train.log) and the command's own
(<mcad cache>/logs/<command>.log, rewritten each run; the cache is $MCAD_CACHE_DIR or ~/.cache/mcad)."""
from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
from pathlib import Path

COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("mcad.data.cli", "make the synthetic benchmark (or check a data set) and report its ceiling"),
    "teachers": ("mcad.distill.teachers", "train the dual and fusion teachers on the embedded default"),
    "eval": ("mcad.evaluate", "retrieval R@1/5/10 + RSUM of a checkpoint (and fusion re-ranking)"),
    "cache": ("mcad.distill.cache", "run the teachers once over a data set and store their outputs"),
    "student": ("mcad.distill.recipe", "distill the student (MCAD) and evaluate it"),
    "ablation": ("mcad.distill.ablation", "no-KD / dual-KD / single-KD / MCAD over seeds"),
    "export": ("mcad.export.cli", "quantize and export the student for a target (cpu, snapdragon, dimensity)"),
    "bench": ("mcad.benchmarks.cli", "search latency and running memory on a device, against budgets"),
    "index": ("mcad.search.index", "build or extend a faiss index over a gallery"),
    "search": ("mcad.search.query", "query an index with text"),
    "report": ("mcad.search.report", "write the HTML report of a run"),
}
HELP_FLAGS = ("-h", "--help")

# errno -> what it means for the path named and what to do about it
OS_FIXES: dict[int, str] = {
    errno.ENOSPC: "no space left on the device: free space there (or write to another disk) and run the command again",
    errno.EDQUOT: "disk quota exceeded: free space in your quota (or write elsewhere) and run the command again",
    errno.EACCES: "permission denied: give a path you may read/write, or change its permissions",
    errno.EPERM: "operation not permitted: give a path you own, or change its permissions",
    errno.EEXIST: "already exists (and is not what the command writes there): remove it or give another path",
    errno.ENOTDIR: "a part of this path is a file, not a folder: give another path",
    errno.EISDIR: "is a folder where a file is needed: give a file path",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EROFS: "on a read-only file system: write to another place",
    errno.ENAMETOOLONG: "the name is too long for the file system: give a shorter path",
    errno.ELOOP: "too many levels of symlinks (a link loop): give the real path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or use fewer workers",
    errno.ENFILE: "too many open files on the system: close other programs or use fewer workers",
    errno.EIO: "input/output error from the device: check the disk (dmesg) and run the command again",
    errno.ENOTEMPTY: "the folder is not empty: remove what is in it or give another folder",
    errno.EXDEV: "cannot move across file systems: keep the output on one disk",
    errno.ENOMEM: "out of memory: use a smaller batch or fewer workers",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mcad <command> [options] [key=value ...]", "", "commands:",
             *[f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()],
             "", "mcad <command> --help: that command's options"]
    return "\n".join(lines)


def command_help(name: str, module) -> str:
    """`mcad <command> --help`: the command's summary line, then its usage (`USAGE`) and documentation."""
    parts = [f"mcad {name}: {COMMANDS[name][1]}"]
    parts += [text.strip() for text in (getattr(module, "USAGE", None), module.__doc__) if text]
    return "\n\n".join(parts)


def os_error_line(e: OSError) -> str:
    """`<path>: <what it means>: <fix>` for an OSError; its own text when it names no path (mcad's
    own messages, e.g. `FileNotFoundError("<run>: no such run folder ...")`)."""
    if e.filename is None:
        if e.errno is None:
            return one_line(str(e.args[0] if len(e.args) == 1 else e))
        return OS_FIXES.get(e.errno) or f"{e.strerror or e}"
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
    fix = OS_FIXES.get(e.errno) if e.errno is not None else None
    return f"{where}: {fix or e.strerror or type(e).__name__}"


LIBRARY_ERRORS: dict[str, tuple[str, ...]] = {
    "safetensors": ("SafetensorError",), "yaml": ("YAMLError",), "zipfile": ("BadZipFile",),
    "pickle": ("UnpicklingError",), "google.protobuf.message": ("DecodeError",), "PIL.Image": ("DecompressionBombError",),
    "onnx.onnx_cpp2py_export.checker": ("ValidationError",),
    "onnxruntime.capi.onnxruntime_pybind11_state": ("Fail", "InvalidArgument", "NoSuchFile", "InvalidProtobuf",
                                                    "InvalidGraph", "RuntimeException"),
}


def library_errors() -> tuple[type, ...]:
    """The error types of libraries that mean a damaged or unsupported input, not a bug in mcad;
    only those of libraries already loaded (a library not imported cannot have raised)."""
    found: list[type] = []
    for module, attrs in LIBRARY_ERRORS.items():
        mod = sys.modules.get(module)
        found += [getattr(mod, a) for a in attrs if mod is not None and isinstance(getattr(mod, a, None), type)]
    return tuple(found)


def one_line(text: str) -> str:
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip())


def error_line(e: BaseException) -> str | None:
    """The one line for an error the user can act on; None for anything else (a bug: traceback)."""
    if isinstance(e, OSError):
        return os_error_line(e)
    if isinstance(e, KeyError):
        return str(e.args[0]) if e.args else "missing key"
    if isinstance(e, (ValueError, RuntimeError, EOFError)):
        return one_line(str(e)) or type(e).__name__
    if isinstance(e, MemoryError):
        return "out of memory (MemoryError): use a smaller batch, fewer workers or a smaller data set"
    if isinstance(e, ImportError):
        return f"{e}: a dependency is missing; run `make install` (the pinned environment)"
    if isinstance(e, library_errors()):
        return f"{type(e).__name__}: {one_line(str(e))} (a damaged or unsupported file)"
    return None


# -- what reaches the console ------------------------------------------------------------------------
# Libraries log and warn as they load (torchao's extension probes, triton's absence, faiss's CPU
# feature probes, torch's deprecations): a user's console shows mcad's own lines and any error; the
# rest goes to the logs (the root logger's other handlers: the command's log, a run's train.log).
OWN_LOGGERS = ("mcad", "root", "__main__")
# Loggers of libraries that print through a handler of their own (torch's, made when torch is
# imported) rather than the root's: filtered on the logger, as their handler may not exist yet.
# A logger's filter sees only the records made on that very logger, so the known ones are named; the
# handler torch makes is filtered too once torch is loaded (LIBRARY_HANDLERS).
OWN_HANDLER_LOGGERS = ("torch.utils._pytree",)
LIBRARY_HANDLERS = ("torch",)  # loggers whose own console handlers get the filter once the library is loaded


def is_own_logger(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in OWN_LOGGERS)


class LibraryNoise(logging.Filter):
    """Passes mcad's own records and any error; a library's warnings and info are kept from the
    console. `forward`: for a library's own handler, whose records never reach the root: they are
    handed to the root's non-console handlers (the run's log) instead."""

    def __init__(self, forward: bool = False):
        super().__init__()
        self.forward = forward

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR or is_own_logger(record.name):
            return True
        if self.forward and not getattr(record, "_mcad_forwarded", False):
            # once per record: a root handler that is itself a library's (or filters like this one)
            # would hand it back here without end
            record._mcad_forwarded = True
            for h in logging.getLogger().handlers:
                if not is_console(h) and record.levelno >= h.level and not _forwards(h):
                    h.handle(record)
        return False


def _forwards(handler: logging.Handler) -> bool:
    return any(isinstance(f, LibraryNoise) and f.forward for f in handler.filters)


def is_console(handler: logging.Handler) -> bool:
    return type(handler) is logging.StreamHandler and getattr(handler, "stream", None) in (sys.stderr, sys.stdout)


def own_dirs() -> tuple[str, ...]:
    """The folders of mcad's code (the package and its stages, which may live elsewhere: package-dir)."""
    import importlib.util

    import mcad

    dirs = list(mcad.__path__)
    for stage in ("distill", "export", "quantize", "device", "benchmarks", "search"):
        spec = importlib.util.find_spec(f"mcad.{stage}")
        dirs += list(spec.submodule_search_locations or []) if spec else []
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs)


def route_warnings() -> None:
    """Python warnings become log records: mcad's own under `mcad.warnings` (shown), a library's
    under `py.warnings` (the run's log only)."""
    import warnings

    if getattr(warnings.showwarning, "_mcad", False):
        return
    mine = own_dirs()

    def showwarning(message, category, filename, lineno, file=None, line=None):
        own = os.path.realpath(str(filename)).startswith(mine)
        text = warnings.formatwarning(message, category, filename, lineno, "").rstrip()  # one line: no source
        logging.getLogger("mcad.warnings" if own else "py.warnings").warning("%s", text)

    showwarning._mcad = True
    warnings.showwarning = showwarning


def command_log(name: str) -> Path | None:
    """Every command's log, beside any run log: <mcad cache>/logs/<command>.log, rewritten by each
    run, so what libraries log and warn is kept where a command has no run folder (export, bench,
    index, search...). None where that path is not a regular file mcad may write (left alone)."""
    from mcad.data.scan import mcad_cache_dir
    from mcad.io import OutputRefused
    from mcad.logs import attach_log

    path = mcad_cache_dir() / "logs" / f"{name}.log"
    try:
        return Path(attach_log(path, "command", mode="w").baseFilename)
    except (OSError, OutputRefused):  # not a regular file there: left alone
        return None


def quiet_libraries() -> None:
    """The console handler(s) of the root logger keep library noise out; so do the loggers of
    OWN_HANDLER_LOGGERS. Idempotent (tests call `main` many times in one process)."""
    for h in logging.getLogger().handlers:
        if is_console(h) and not any(isinstance(f, LibraryNoise) for f in h.filters):
            h.addFilter(LibraryNoise())
    for name in OWN_HANDLER_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, LibraryNoise) for f in lg.filters):
            lg.addFilter(LibraryNoise(forward=True))
    for name in LIBRARY_HANDLERS:
        if name in sys.modules:
            for h in logging.getLogger(name).handlers:
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) \
                        and not any(isinstance(f, LibraryNoise) for f in h.filters):
                    h.addFilter(LibraryNoise(forward=True))
    route_warnings()


# -- SIGTERM -------------------------------------------------------------------------------------------
class Terminated(SystemExit):
    """SIGTERM as an exception: the command's stack unwinds (DataLoader workers are shut down, files
    closed, locks released) and the process exits 128 + SIGTERM."""


def _terminate(signum, frame):
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM (a stuck unwind) ends the process at once
    raise Terminated(128 + signum)


def exit_on_sigterm():
    """Install the SIGTERM handler where it may be (the main thread, nobody else's handler there);
    -> the previous handler to restore, or None."""
    import signal
    import threading

    # under torchrun a rank may sit in a collective, where Python handlers never run: torchrun's own
    # SIGTERM must end it as the default does
    elsewhere = threading.current_thread() is not threading.main_thread()
    if elsewhere or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    return signal.signal(signal.SIGTERM, _terminate)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mcad: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    command_log(name)
    quiet_libraries()
    previous = exit_on_sigterm()
    try:
        return run(name, rest)
    except Terminated as e:
        print(f"mcad {name}: terminated (SIGTERM)", file=sys.stderr)
        return int(e.code)
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


def run(name: str, rest: list[str]) -> int:
    try:
        module = importlib.import_module(COMMANDS[name][0])
        quiet_libraries()  # the handlers its imports made (torch's)
        if any(a in HELP_FLAGS for a in rest):
            print(command_help(name, module))
            return 0
        return int(module.main(rest) or 0)
    except KeyboardInterrupt as e:  # Ctrl-C: one line (training says where its checkpoint is), 128 + SIGINT
        print(f"mcad {name}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        return 130
    except Exception as e:
        line = error_line(e)
        if line is None or os.environ.get("MCAD_DEBUG"):  # a bug, or asked for: the traceback
            raise
        print(f"mcad {name}: error: {line}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
