"""Which ONNX Runtime execution providers can really run on this machine, resolved once per process.

ONNX Runtime's own fallback (TensorRT -> CUDA -> CPU) prints banners to stdout, where `inspect` writes
its JSON, and pays for every failed attempt in every session. So the configured order is resolved up
front: a GPU provider is kept only when its library loads (which names the missing CUDA/TensorRT
library when it does not) and a one-node probe model really runs on it. Sessions are then created
with exactly the providers that work, and one log line says which are in use and why others were
skipped.
"""

from __future__ import annotations

import base64
import ctypes
import logging
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lineside.agent.errors import InferenceError

logger = logging.getLogger(__name__)

PROVIDERS = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}
DEFAULT_PROVIDERS = ["tensorrt", "cuda", "cpu"]
_LIBRARIES = {
    "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so",
    "CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
}
# y = Relu(x), x: float[1], opset 13: enough to make a provider create its kernels on the device.
_PROBE_MODEL = base64.b64decode(
    "CAgSCGxpbmVzaWRlOjcKDAoBeBIBeSIEUmVsdRIFcHJvYmVaDwoBeBIKCggIARIECgIIAWIPCgF5EgoKCAgBEgQKAggBQgQKABAN"
)

ProviderEntry = str | tuple[str, dict[str, object]]


@dataclass(frozen=True)
class ResolvedProviders:
    """The provider entries to create sessions with, and why the others of the configured order were left out."""

    entries: list[ProviderEntry]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [e[0] if isinstance(e, tuple) else e for e in self.entries]

    @property
    def has_gpu(self) -> bool:
        return bool(GPU_PROVIDERS & set(self.names))


_lock = threading.Lock()
_resolved: dict[tuple[object, ...], ResolvedProviders] = {}


def _library_problem(provider: str) -> str | None:
    """Why the provider's shared library cannot load here (e.g. 'libcublasLt.so.13: cannot open ...'), or None."""
    library = _LIBRARIES.get(provider)
    if library is None or not sys.platform.startswith("linux"):
        return None
    path = Path(ort.__file__).parent / "capi" / library
    if not path.is_file():
        return f"{library} is not part of this ONNX Runtime install"
    try:
        ctypes.CDLL(str(path))
    except OSError as err:
        return str(err).replace(f"{path}: ", "")
    return None


def _probe(entry: ProviderEntry) -> str | None:
    """Run the probe model on the provider alone; None when it works, else why not."""
    name = entry[0] if isinstance(entry, tuple) else entry
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the reason is reported by our own log line
    try:
        # enable_fallback=0: fail here instead of printing ONNX Runtime's fallback banner to stdout.
        session = ort.InferenceSession(_PROBE_MODEL, sess_options=options, providers=[entry], enable_fallback=0)
        session.run(None, {"x": np.ones(1, np.float32)})
    except Exception as err:  # onnxruntime raises its own exception types
        return f"{name} failed on a probe model: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    if session.get_providers()[0] != name:
        return f"{name} could not be created (driver or device missing)"
    return None


def resolve_providers(
    names: list[str] | None = None,
    *,
    device_id: int = 0,
    trt_fp16: bool = True,
    trt_cache_dir: Path | None = None,
) -> ResolvedProviders:
    """The configured provider order, keeping only providers that work here. Cached per process."""
    names = list(names or DEFAULT_PROVIDERS)
    key = (tuple(names), device_id, trt_fp16, str(trt_cache_dir))
    with _lock:
        cached = _resolved.get(key)
        if cached is not None:
            return cached
        available = set(ort.get_available_providers())
        entries: list[ProviderEntry] = []
        skipped: dict[str, str] = {}
        for name in names:
            full = PROVIDERS.get(name)
            if full is None:
                raise InferenceError(f"unknown execution provider {name!r}; expected one of {sorted(PROVIDERS)}")
            if full not in available:
                skipped[name] = f"not in this ONNX Runtime build ({ort.__version__})"
                continue
            entry: ProviderEntry
            if name == "tensorrt":
                options: dict[str, object] = {"device_id": device_id, "trt_fp16_enable": trt_fp16}
                entry = (full, options)
            elif name == "cuda":
                entry = (full, {"device_id": device_id})
            else:
                entries.append(full)
                continue
            problem = _library_problem(full) or _probe(entry)
            if problem is not None:
                skipped[name] = problem
                continue
            if name == "tensorrt" and trt_cache_dir is not None:
                trt_cache_dir.mkdir(parents=True, exist_ok=True)
                entry[1].update({"trt_engine_cache_enable": True, "trt_engine_cache_path": str(trt_cache_dir)})
            entries.append(entry)
        if not entries:
            raise InferenceError(
                f"none of the providers {names} can run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
            )
        resolved = _resolved[key] = ResolvedProviders(entries, skipped)
    # A warning when a GPU provider was asked for and cannot run: the station runs slower than planned.
    level = logging.WARNING if skipped and not resolved.has_gpu else logging.INFO
    logger.log(
        level,
        "execution providers: %s%s",
        ", ".join(resolved.names),
        "".join(f"; {name} skipped: {why}" for name, why in skipped.items()),
    )
    return resolved
