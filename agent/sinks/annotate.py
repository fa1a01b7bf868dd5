"""Annotated 8-bit JPEG copies of inspected images, for people at the line."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from lineside.agent.imaging import IMAGE_SUFFIXES
from lineside.agent.plugins import StrictConfig, path_problems
from lineside.agent.results import Frame, InspectionResult
from lineside.agent.sinks.base import Sink

# BGR. Distinct hues so an operator can tell which model found a defect.
BOX_COLOURS = {"ssd": (0, 0, 255), "vae": (255, 160, 0)}
VERDICT_COLOURS = {"DEFECTIVE": (0, 0, 255), "OK": (0, 200, 0), "ERROR": (0, 200, 255)}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def to_display(image: np.ndarray) -> np.ndarray:
    """8-bit grey for display: 16-bit images are windowed to their 0.5-99.5 percentile range."""
    if image.dtype == np.uint8:
        return image
    low, high = np.percentile(image, (0.5, 99.5))
    if high <= low:
        high = low + 1.0
    scaled = (image.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def annotation_name(frame: Frame) -> str:
    """A safe file name for a frame's annotated copy: its name without the image suffix, plus .jpg."""
    name = str(frame.meta.get("file") or frame.frame_id)
    suffix = Path(name).suffix
    stem = name[: -len(suffix)] if suffix.lower() in IMAGE_SUFFIXES else name
    if "loop" in frame.meta:
        stem = f"{stem}.loop{frame.meta['loop']}"
    return _UNSAFE.sub("_", stem).strip("._") + ".jpg"


def _label(canvas: np.ndarray, text: str, origin: tuple[int, int], scale: float, colour: tuple, thick: int) -> int:
    """Text on a dark box (readable on any background); returns the y below the box."""
    (width, height), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x, y = origin
    pad = max(2, thick)
    cv2.rectangle(canvas, (x - pad, y - height - pad), (x + width + pad, y + baseline + pad), (0, 0, 0), -1)
    cv2.putText(canvas, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thick, cv2.LINE_AA)
    return y + baseline + pad


def draw(image: np.ndarray, result: InspectionResult) -> np.ndarray:
    """A BGR copy of the image with boxes, box scores, the verdict and the bundle version drawn."""
    canvas = cv2.cvtColor(to_display(image), cv2.COLOR_GRAY2BGR)
    height, width = image.shape[:2]
    # Line width and font scale follow image size, so annotations stay legible on 4k panels.
    thickness = max(1, round(min(height, width) / 400))
    font_scale = max(0.35, min(height, width) / 900)
    for box in result.boxes:
        colour = BOX_COLOURS.get(box.source, (255, 255, 255))
        p1 = (round(box.x1), round(box.y1))
        p2 = (round(box.x2), round(box.y2))
        cv2.rectangle(canvas, p1, p2, colour, thickness)
        label = f"{box.source} {box.score:.2f}"
        cv2.putText(
            canvas,
            label,
            (p1[0], max(p1[1] - 3, 10)),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale * 0.8,
            colour,
            thickness,
            cv2.LINE_AA,
        )
    if result.error is not None:
        verdict, text = "ERROR", f"ERROR {result.error.code}"
    else:
        verdict = "DEFECTIVE" if result.is_defective else "OK"
        text = f"{verdict} {result.score:.2f}" if result.score is not None else verdict
    margin = 4 + thickness * 2
    below = _label(
        canvas, text, (margin, margin + int(24 * font_scale)), font_scale, VERDICT_COLOURS[verdict], thickness
    )
    if result.bundle_version:
        small = font_scale * 0.6
        _label(
            canvas,
            f"bundle {result.bundle_version}",
            (margin, below + int(24 * small)),
            small,
            (220, 220, 220),
            1,
        )
    return canvas


class AnnotateSinkConfig(StrictConfig):
    """8-bit JPEG copies of the images with boxes and verdict drawn, for people."""

    kind: Literal["annotate"] = Field(description="Selects the annotated-image sink.")
    folder: Path = Field(description="Folder the annotated JPEGs are written to.")
    only_defective: bool = Field(default=False, description="Write only images judged defective.")
    jpeg_quality: int = Field(default=90, ge=1, le=100, description="JPEG quality, 1-100.")
    durable: bool = Field(
        default=False,
        description="A frame is acknowledged to its source only after this sink stored the result.",
    )

    def problems(self, key: str) -> list[str]:
        return path_problems(self.folder, f"{key}.folder", write=True, create=True)


class AnnotateSink(Sink):
    """Writes FOLDER/<frame name>.jpg for each result that has an image (undecodable frames have none)."""

    config_class = AnnotateSinkConfig

    def __init__(
        self, folder: Path, *, only_defective: bool = False, jpeg_quality: int = 90, durable: bool = False
    ) -> None:
        self.folder = Path(folder)
        self.only_defective = only_defective
        self.jpeg_quality = jpeg_quality
        self.durable = durable
        self.name = f"annotate:{self.folder}"
        self.folder.mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_config(cls, config: AnnotateSinkConfig) -> AnnotateSink:
        return cls(
            config.folder,
            only_defective=config.only_defective,
            jpeg_quality=config.jpeg_quality,
            durable=config.durable,
        )

    def publish(self, result: InspectionResult, frame: Frame) -> None:
        """Draw and write the annotated copy; atomically, so readers never see half a JPEG."""
        if frame.image is None or (self.only_defective and not result.is_defective):
            return
        canvas = draw(frame.image, result)
        ok, encoded = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise OSError(f"JPEG encoding of frame {frame.frame_id} failed")
        target = self.folder / annotation_name(frame)
        tmp = self.folder / f".{target.name}.tmp"
        tmp.write_bytes(encoded.tobytes())
        os.replace(tmp, target)
