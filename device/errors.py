"""One clear line for every way a device can fail (the CLI prints it, no traceback)."""
from __future__ import annotations


class DeviceError(RuntimeError):
    """Missing device, unauthorized/offline device, missing runner, timeout, runner failure."""


def one_line(text: str, limit: int = 400) -> str:
    """The first non-empty, non-decoration line of a (possibly multi-line, boxed) message."""
    for line in str(text).splitlines():
        line = line.strip().strip("|│┌┐└┘─ ").strip()
        if line:
            return line[:limit]
    return str(text).strip()[:limit]


class DeviceGone(DeviceError):
    """The device itself is unusable (not found, unauthorized, offline): stop, do not try more jobs."""
