"""Tile classifier: a GluonCV backbone with a 2-class head (defect-free / defective).

The image score is the maximum tile probability, so a 15 px pore on a 768x572 radiograph is judged
at native resolution instead of being averaged away by a whole-image resize.
"""

from __future__ import annotations

from mxnet.gluon import HybridBlock


def build_classifier(backbone: str = "mobilenet0.25", pretrained: bool = False) -> HybridBlock:
    from gluoncv.model_zoo import get_model

    if pretrained:
        net = get_model(backbone, pretrained=True)
        with net.name_scope():
            from mxnet.gluon import nn

            net.output = nn.Dense(2)
        return net
    return get_model(backbone, classes=2, pretrained=False)


class ClassifierExport(HybridBlock):
    """Adds the softmax so the graph outputs probabilities."""

    def __init__(self, net: HybridBlock, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = net

    def hybrid_forward(self, F, x):
        return F.softmax(self.net(x), axis=-1)
