"""The NVIDIA driver's NVML (`libnvidia-ml.so.1`) through ctypes: GPU names and memory, no package needed.

Used by the health service's /metrics and by `bench`; everything is empty where there is no driver
(CPU boxes, Jetson's iGPU).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

logger = logging.getLogger(__name__)


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class Nvml:
    """NVML, loaded and initialised once; `available` is False without a driver."""

    def __init__(self) -> None:
        self._nvml: ctypes.CDLL | None = None
        try:
            nvml = ctypes.CDLL("libnvidia-ml.so.1")
            if nvml.nvmlInit_v2() == 0:
                self._nvml = nvml
        except (OSError, AttributeError):
            self._nvml = None
        if self._nvml is None:
            logger.debug("no NVML: no GPU figures")

    @property
    def available(self) -> bool:
        return self._nvml is not None

    def memory(self) -> dict[int, tuple[int, int]]:
        """{device index: (used bytes, total bytes)}; empty without NVML or on an error."""
        nvml = self._nvml
        if nvml is None:
            return {}
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return {}
        found = {}
        for index in range(count.value):
            handle = ctypes.c_void_p()
            info = _NvmlMemory()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                continue
            if nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(info)) == 0:
                found[index] = (int(info.used), int(info.total))
        return found

    def driver_version(self) -> str | None:
        """The NVIDIA driver's version, e.g. '580.95.05'; None without NVML."""
        if self._nvml is None:
            return None
        buf = ctypes.create_string_buffer(96)
        return buf.value.decode() if self._nvml.nvmlSystemGetDriverVersion(buf, 96) == 0 else None

    def devices(self) -> list[dict[str, Any]]:
        """Per GPU: index, name, used and total memory in MiB; empty without NVML."""
        nvml = self._nvml
        found: list[dict[str, Any]] = []
        for index, (used, total) in sorted(self.memory().items()):
            handle = ctypes.c_void_p()
            name = ctypes.create_string_buffer(96)
            ok = nvml is not None and nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) == 0
            ok = ok and nvml is not None and nvml.nvmlDeviceGetName(handle, name, 96) == 0
            found.append(
                {
                    "index": index,
                    "name": name.value.decode() if ok else "unknown",
                    "used_mb": used / 2**20,
                    "total_mb": total / 2**20,
                }
            )
        return found
