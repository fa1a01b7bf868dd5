"""The device side of a model kind: what its graph outputs are called, how they become an image score and
boxes, and which thresholds it is calibrated with. One file per kind; `agent/models/__init__.py` lists them.

The engine runs each kind's ONNX session and hands its outputs over **by name** (the names the manifest
records); everything kind-specific happens here, so the engine, the decision rule and the manifest stay
generic (anomalib keeps each model behind one interface in the same way).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import Field

from lineside.agent.bundle.schema import FileRef, Strict
from lineside.agent.inference.preprocess import Layout

if TYPE_CHECKING:
    from lineside.agent.bundle.loader import LoadedBundle
    from lineside.agent.bundle.manifest import ModelSpec

NO_BOXES = np.zeros((0, 4), np.float32)
NO_SCORES = np.zeros((0,), np.float32)


class KindPost(Strict):
    """Fixed post-processing parameters of a kind (chosen at export, not calibrated)."""


class KindThresholds(Strict):
    """Calibrated thresholds of a kind; every kind has an image-level one."""

    image: float = Field(description="Raw image score at or above which this model fires for the image.")

    def bounds(self) -> dict[str, tuple[float, float]]:
        """Fields an operator may change at run time (`set-thresholds`), with their closed bounds.

        Derived from these (the bundle's calibrated) values where the score has no natural range, so the
        bundle decides how far a station may move away from its calibration. Nothing by default.
        """
        return {}


@dataclass(frozen=True)
class KindOutput:
    """Threshold-free output of one model for one image (what calibration sweeps over).

    `score` is the raw image score; localisers add their candidate boxes in original-image pixels.
    """

    score: float


class ModelKind(ABC):
    """One model kind on the device; built once per engine from its manifest entry."""

    name: ClassVar[str]
    output_names: ClassVar[tuple[str, ...]]  # graph outputs, in the order the export writes them
    post_class: ClassVar[type[KindPost]]
    thresholds_class: ClassVar[type[KindThresholds]]
    localiser: ClassVar[bool] = False  # produces boxes

    def __init__(self, spec: ModelSpec, bundle: LoadedBundle) -> None:
        self.spec = spec

    @classmethod
    def extra_files(cls, post: KindPost) -> list[FileRef]:
        """Bundle files besides the ONNX graph that this kind reads (checked by sha256 like the graph)."""
        return []

    @abstractmethod
    def outputs(self, tensors: dict[str, np.ndarray], unit: np.ndarray, layout: Layout) -> KindOutput:
        """The graph's outputs for one image's batch (by name) -> threshold-free output.

        `unit` is the windowed original image in [0, 1]; `layout` says where each batch item came from.
        The arrays may be reused by the next run: copy what is kept.
        """

    @classmethod
    def boxes(cls, out: KindOutput, thresholds: KindThresholds) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (N, 4) in original pixels, scores (N,)) reported for a defective verdict; none by default."""
        return NO_BOXES, NO_SCORES


def calibrated_score(score: float, threshold: float) -> float:
    """Map a raw score to [0, 1] so that `threshold` lands on 0.5 (monotone, continuous)."""
    if threshold <= 0:
        return 1.0 if score >= threshold else 0.0
    if score < threshold:
        return max(0.0, 0.5 * score / threshold)
    return 1.0 - 0.5 * threshold / score
