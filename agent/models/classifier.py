"""Tile classifier: the image score is the highest tile probability of 'defective'."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from lineside.agent.inference.preprocess import Layout
from lineside.agent.models.base import KindOutput, KindPost, KindThresholds, ModelKind


class ClassifierPost(KindPost):
    kind: Literal["classifier"] = "classifier"
    positive_index: int = Field(default=1, description="Index of the 'defective' class in the output.")
    aggregate: Literal["max"] = Field(default="max", description="How tile scores make the image score.")


class ClassifierThresholds(KindThresholds):
    kind: Literal["classifier"] = "classifier"
    image: float = Field(default=0.5, description="Max tile probability at or above which the classifier fires.")

    def bounds(self) -> dict[str, tuple[float, float]]:
        return {"image": (0.0, 1.0)}  # a probability


class Classifier(ModelKind):
    name = "classifier"
    output_names = ("probabilities",)
    post_class = ClassifierPost
    thresholds_class = ClassifierThresholds

    def outputs(self, tensors: dict[str, np.ndarray], unit: np.ndarray, layout: Layout) -> KindOutput:
        post = self.spec.postprocessing
        assert isinstance(post, ClassifierPost)
        return KindOutput(score=float(tensors["probabilities"][:, post.positive_index].max()))
