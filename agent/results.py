"""Frames going into the pipeline and the versioned inspection results coming out of it."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

RESULT_SCHEMA_VERSION: Literal[1] = 1
# Result ids are uuid5(station, source, frame key): a frame seen twice (e.g. after a crash) gets the same
# id, so sinks and downstream systems can de-duplicate; two stations never share one.
_RESULT_NAMESPACE = uuid.UUID("6f1f4a52-4c1e-4d55-9a38-0c7d9d6a2f10")

INJECTED_SOURCE = "trigger"  # Frame.source of a file the PLC asked to inspect now (not the source's frame)


def result_id_for(station: str, source: str, frame_key: str) -> str:
    """Stable result id of a frame, derived from its station, source and identity key."""
    return str(uuid.uuid5(_RESULT_NAMESPACE, f"{station}\x00{source}\x00{frame_key}"))


@dataclass(frozen=True)
class FrameError:
    """Why a frame could not be inspected; `code` is stable and machine-readable."""

    code: str
    message: str


@dataclass(frozen=True)
class Frame:
    """One X-ray image as captured, before inspection.

    `image` is a 2-D uint8/uint16 array, or None when `error` says why it could not be read.
    `key` identifies the frame's content (e.g. file name + sha256) and makes the result id stable.
    """

    frame_id: str
    key: str
    source: str
    image: np.ndarray | None
    captured_wall: datetime
    captured_mono: float
    part_id: str | None = None
    view: int | None = None
    bits_stored: int | None = None
    error: FrameError | None = None
    decode_ms: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    station: str = ""

    @property
    def result_id(self) -> str:
        return result_id_for(self.station, self.source, self.key)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResultBox(_Frozen):
    """A defect box in original-image pixels."""

    x1: float
    y1: float
    x2: float
    y2: float
    score: float
    source: str = Field(description="The model kind that produced the box, e.g. 'ssd' or 'vae'.")


class ResultError(_Frozen):
    code: str = Field(description="Stable reason, e.g. 'decode_failed', 'too_large', 'inference_failed'.")
    message: str


class InspectionResult(_Frozen):
    """What the agent says about one frame. Published as one JSON object per frame."""

    schema_version: Literal[1] = RESULT_SCHEMA_VERSION
    result_id: str
    frame_id: str
    source: str
    part_id: str | None = None
    view: int | None = None
    captured_at: datetime = Field(description="Capture wall-clock time (UTC).")
    inspected_at: datetime = Field(description="Wall-clock time the result was made (UTC).")
    latency_ms: dict[str, float] = Field(
        default_factory=dict,
        description="Monotonic per-stage latencies: decode, queue, preprocess, models...",
    )
    bundle_id: str | None = None
    bundle_version: str | None = None
    providers: list[str] = Field(default_factory=list)
    width: int | None = None
    height: int | None = None
    is_defective: bool | None = Field(description="None only when `error` is set.")
    score: float | None = Field(description="Calibrated score in [0, 1]; 0.5 is the decision boundary.")
    model_scores: dict[str, float] = Field(default_factory=dict, description="Raw image score per model.")
    boxes: list[ResultBox] = Field(default_factory=list)
    error: ResultError | None = None
    meta: dict[str, Any] = Field(default_factory=dict, description="Source metadata, e.g. file name.")
