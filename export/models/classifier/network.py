"""Tile classifier: a GluonCV backbone with a 2-class head (defect-free / defective).

The head max-pools the backbone's feature map instead of averaging it: a 15 px pore covers a few
cells of an 8x8 map and would be diluted by a global average. The image score is the maximum tile
probability, so defects are judged at native resolution, not averaged away by a whole-image resize.
"""

from __future__ import annotations

from mxnet.gluon import HybridBlock, nn

CLASSIFIER_TILE = 128


class MaxPoolClassifier(HybridBlock):
    """backbone features (without their global average pool) -> global max pool -> Dense(2)."""

    def __init__(self, backbone: str = "mobilenet0.25", pretrained: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        from gluoncv.model_zoo import get_model

        base = get_model(backbone, pretrained=pretrained)
        with self.name_scope():
            self.features = nn.HybridSequential()
            # GluonCV classification nets end their `features` with GlobalAvgPool2D (+ Flatten).
            for layer in base.features:
                if isinstance(layer, nn.GlobalAvgPool2D | nn.Flatten):
                    continue
                self.features.add(layer)
            self.pool = nn.GlobalMaxPool2D()
            self.output = nn.Dense(2)

    def hybrid_forward(self, F, x):
        return self.output(F.flatten(self.pool(self.features(x))))


def build_classifier(backbone: str = "mobilenet0.25", pretrained: bool = False) -> HybridBlock:
    return MaxPoolClassifier(backbone, pretrained=pretrained)


class ClassifierExport(HybridBlock):
    """Adds the softmax so the graph outputs probabilities."""

    def __init__(self, net: HybridBlock, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = net

    def hybrid_forward(self, F, x):
        return F.softmax(self.net(x), axis=-1)
