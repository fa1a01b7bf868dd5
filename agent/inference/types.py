"""What the inference engine returns for one image."""

from __future__ import annotations

from dataclasses import dataclass, field

from lineside.agent.models.base import KindOutput


@dataclass(frozen=True)
class Detection:
    """A defect box in original-image pixels."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    source: str  # the model kind that produced it


@dataclass(frozen=True)
class ModelOutputs:
    """Raw, threshold-free outputs of the bundle's models for one image, per model kind."""

    height: int
    width: int
    models: dict[str, KindOutput]
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Prediction:
    """The bundle's decision for one image."""

    is_defective: bool
    score: float
    boxes: tuple[Detection, ...]
    model_scores: dict[str, float]
    fired: tuple[str, ...]
    timings_ms: dict[str, float]
