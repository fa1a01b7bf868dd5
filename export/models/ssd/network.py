"""SSD-MobileNet detectors (GluonCV) for one class, `defect`, and their raw-head export view.

GDXray defects are 10-40 px on 768x572 radiographs. The default presets therefore run on
native-resolution 256 px tiles with a stride-8 feature map and small anchors; `ssd512` is the
study's whole-image ssd_512_mobilenet1.0 for comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import mxnet as mx
from mxnet import autograd
from mxnet.gluon import HybridBlock


@dataclass(frozen=True)
class SSDPreset:
    name: str
    network: str
    input_size: int
    mode: str  # "tile" or "resize"
    features: tuple[str, ...]
    filters: tuple[int, ...]
    sizes: tuple[float, ...]
    ratios: tuple[tuple[float, ...], ...]
    steps: tuple[int, ...]
    rgb: bool = False  # 3 input channels (ImageNet backbones expect them)


_SMALL = dict(
    input_size=256,
    mode="tile",
    features=("relu10_fwd", "relu22_fwd", "relu26_fwd"),
    filters=(256, 256),
    sizes=(12.0, 24.0, 48.0, 96.0, 160.0, 256.0),
    ratios=((1.0, 2.0, 0.5, 3.0, 1.0 / 3),) * 2 + ((1.0, 2.0, 0.5),) * 3,
    steps=(8, 16, 32, 64, 128),
)

PRESETS: dict[str, SSDPreset] = {
    # CPU-friendly default: ~5x cheaper per tile than mobilenet1.0.
    "tile256-mobilenet0.25": SSDPreset("tile256-mobilenet0.25", "mobilenet0.25", **_SMALL),
    "tile256-mobilenet1.0": SSDPreset("tile256-mobilenet1.0", "mobilenet1.0", **_SMALL),
    # MobileNetV2 for ImageNet weights (`--imagenet`, export.imagenet): the expansion layers of the
    # first stride-16 and stride-32 blocks (SSDLite's taps) give strides 8 and 16, then the 1280-ch head.
    "tile256-mobilenetv2_1.0": SSDPreset(
        "tile256-mobilenetv2_1.0",
        "mobilenetv2_1.0",
        **{
            **_SMALL,
            "features": (
                "features_linearbottleneck6_relu60_relu6",
                "features_linearbottleneck13_relu60_relu6",
                "features_relu61_relu6",
            ),
        },
        rgb=True,
    ),
    # The study's network: ssd_512_mobilenet1.0 on the whole image resized to 512x512.
    "ssd512-mobilenet1.0": SSDPreset(
        "ssd512-mobilenet1.0",
        "mobilenet1.0",
        input_size=512,
        mode="resize",
        features=("relu22_fwd", "relu26_fwd"),
        filters=(512, 512, 256, 256),
        sizes=(51.2, 102.4, 189.4, 276.4, 363.52, 450.6, 492.0),
        ratios=((1.0, 2.0, 0.5),) + ((1.0, 2.0, 0.5, 3.0, 1.0 / 3),) * 3 + ((1.0, 2.0, 0.5),) * 2,
        steps=(16, 32, 64, 128, 256, 512),
    ),
}


def build_ssd(preset: SSDPreset, pretrained_base: bool = False) -> HybridBlock:
    from gluoncv.model_zoo.ssd import SSD

    net = SSD(
        network=preset.network,
        base_size=preset.input_size,
        features=list(preset.features),
        num_filters=list(preset.filters),
        sizes=list(preset.sizes),
        ratios=[list(r) for r in preset.ratios],
        steps=list(preset.steps),
        classes=["defect"],
        pretrained=pretrained_base,
    )
    net._lineside_rgb = preset.rgb
    return net


def anchors_of(net: HybridBlock, input_size: int, ctx: mx.Context) -> mx.nd.NDArray:
    """(A, 4) anchors in center form, pixels of the input tile."""
    x = mx.nd.zeros((1, 3 if _wants_rgb(net) else 1, input_size, input_size), ctx=ctx)
    with autograd.train_mode():
        _, _, anchors = net(x)
    return anchors.reshape((-1, 4))


def _wants_rgb(net: HybridBlock) -> bool:
    return bool(getattr(net, "_lineside_rgb", False))


class SSDRawHeads(HybridBlock):
    """Inference view for ONNX: tile -> (class probabilities (N, A, 2), box deltas (N, A, 4)).

    Mirrors gluoncv SSD.hybrid_forward up to the heads; decode + NMS run outside the graph.
    """

    def __init__(self, ssd: HybridBlock, **kwargs) -> None:
        super().__init__(**kwargs)
        self.ssd = ssd

    def hybrid_forward(self, F, x):
        ssd = self.ssd
        features = ssd.features(x)
        cls_preds = [
            F.flatten(F.transpose(cp(feat), (0, 2, 3, 1)))
            for feat, cp in zip(features, ssd.class_predictors, strict=True)
        ]
        box_preds = [
            F.flatten(F.transpose(bp(feat), (0, 2, 3, 1)))
            for feat, bp in zip(features, ssd.box_predictors, strict=True)
        ]
        cls = F.concat(*cls_preds, dim=1).reshape((0, -1, ssd.num_classes + 1))
        box = F.concat(*box_preds, dim=1).reshape((0, -1, 4))
        return F.softmax(cls, axis=-1), box
