"""Model kinds on the device. Add one = its file here (+ its folder in export/models/) + a line below."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Field

from lineside.agent.models.base import KindOutput, KindPost, KindThresholds, ModelKind, calibrated_score
from lineside.agent.models.classifier import Classifier, ClassifierPost, ClassifierThresholds
from lineside.agent.models.ssd import SSD, SSDOutput, SSDPost, SSDThresholds
from lineside.agent.models.vae import VAE, VAEOutput, VAEPost, VAEThresholds

KINDS: tuple[type[ModelKind], ...] = (Classifier, VAE, SSD)

MODEL_KINDS: dict[str, type[ModelKind]] = {k.name: k for k in KINDS}


def _union(classes: tuple[type, ...]) -> Any:
    return Annotated[Union[classes], Field(discriminator="kind")]  # noqa: UP007 - built at run time


ModelKindName = Literal[tuple(MODEL_KINDS)]  # type: ignore[valid-type]
PostUnion = _union(tuple(k.post_class for k in KINDS))
ThresholdsUnion = _union(tuple(k.thresholds_class for k in KINDS))
LOCALISERS = tuple(k.name for k in KINDS if k.localiser)

__all__ = [
    "KINDS",
    "LOCALISERS",
    "MODEL_KINDS",
    "SSD",
    "VAE",
    "Classifier",
    "ClassifierPost",
    "ClassifierThresholds",
    "KindOutput",
    "KindPost",
    "KindThresholds",
    "ModelKind",
    "ModelKindName",
    "PostUnion",
    "SSDOutput",
    "SSDPost",
    "SSDThresholds",
    "ThresholdsUnion",
    "VAEOutput",
    "VAEPost",
    "VAEThresholds",
    "calibrated_score",
]
