"""Devices that run the search benchmark: this machine (`local`), a phone/board over adb
(`<serial>`), and Qualcomm AI Hub (`qaihub:<device name>`). See device/README.md."""
from __future__ import annotations

from mcad.device.errors import DeviceError

__all__ = ["DeviceError", "get_device"]


def get_device(spec: str, **options):
    """`local`, an adb serial, or `qaihub:<device name>` -> a Device (not yet connected)."""
    spec = (spec or "local").strip()
    if spec == "local":
        from mcad.device.local import LocalDevice

        return LocalDevice(**options)
    if spec.startswith("qaihub:"):
        from mcad.device.qaihub import QaiHubDevice

        return QaiHubDevice(spec[len("qaihub:"):], **options)
    from mcad.device.adb import AdbDevice

    return AdbDevice(spec, **options)
