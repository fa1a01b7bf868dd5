"""What the inference engine returns for one image."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Detection:
    """A defect box in original-image pixels."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    source: Literal["ssd", "vae"]


@dataclass(frozen=True)
class ModelOutputs:
    """Raw, threshold-free outputs of the models for one image (what calibration sweeps over).

    `ssd_boxes` holds every detection above the bundle's score floor, after NMS;
    `vae_map` is the anomaly map in original-image pixels (None without a VAE).
    """

    height: int
    width: int
    classifier_score: float | None = None
    vae_map: np.ndarray | None = None
    vae_score: float | None = None
    ssd_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    ssd_scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
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
