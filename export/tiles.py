"""Training-time tile sampling over a dataset held in memory.

Tiles are cut at native resolution (or after the preset's resize), exactly as the agent cuts them,
and pass through the same windowing/normalisation (`agent.inference.preprocess`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
from tqdm import tqdm

from lineside.agent.bundle.manifest import Preprocessing
from lineside.agent.errors import DatasetError
from lineside.agent.inference.preprocess import windowed
from lineside.export.data.base import Dataset


@dataclass
class LoadedImage:
    name: str
    group: str
    unit: np.ndarray  # windowed float32 [0,1], already scaled/resized for the preset
    boxes: np.ndarray  # (K, 4) x1,y1,x2,y2 in the same pixels as `unit`
    annotated: bool
    label: bool | None


def load_images(dataset: Dataset, prep: Preprocessing, desc: str) -> list[LoadedImage]:
    """Decode, window and (for 'resize' or scale != 1) resize every image of `dataset`."""
    out: list[LoadedImage] = []
    for sample in tqdm(dataset.samples, desc=f"loading {desc}", unit="img", leave=False, disable=None):
        image = sample.load()
        unit = windowed(image, prep)
        h, w = unit.shape
        boxes = np.asarray([(b.x1, b.y1, b.x2, b.y2) for b in sample.boxes], np.float32).reshape(-1, 4)
        if prep.mode == "resize":
            th, tw = prep.input_size
            sy, sx = th / h, tw / w
        else:
            sy = sx = prep.scale
        if (sy, sx) != (1.0, 1.0):
            unit = cv2.resize(unit, (max(1, round(w * sx)), max(1, round(h * sy))), interpolation=cv2.INTER_AREA)
            boxes = boxes * np.asarray([sx, sy, sx, sy], np.float32)
        out.append(LoadedImage(sample.name, sample.group, unit, boxes, sample.annotated, sample.label))
    if not out:
        raise DatasetError(f"{dataset.root}: the {desc} set is empty")
    return out


def _cut(unit: np.ndarray, y: int, x: int, size: int, pad: float) -> np.ndarray:
    tile = np.full((size, size), pad, np.float32)
    h, w = unit.shape
    ch, cw = min(size, h - y), min(size, w - x)
    tile[:ch, :cw] = unit[y : y + ch, x : x + cw]
    return tile


def boxes_in_tile(boxes: np.ndarray, y: int, x: int, size: int, min_visible: float = 0.5) -> np.ndarray:
    """Boxes shifted into tile coordinates, clipped, keeping those at least `min_visible` inside."""
    if boxes.size == 0:
        return boxes.reshape(0, 4)
    shifted = boxes - np.asarray([x, y, x, y], np.float32)
    clipped = np.clip(shifted, 0, size)
    area = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = visible >= min_visible * np.maximum(area, 1e-6)
    return clipped[keep]


def _overlaps_any(boxes: np.ndarray, y: int, x: int, size: int, margin: int = 4) -> bool:
    if boxes.size == 0:
        return False
    return bool(
        np.any(
            (boxes[:, 0] < x + size + margin)
            & (boxes[:, 2] > x - margin)
            & (boxes[:, 1] < y + size + margin)
            & (boxes[:, 3] > y - margin)
        )
    )


def parse_zoom(text: str) -> tuple[float, float]:
    """'MIN,MAX' -> (MIN, MAX), 0 < MIN <= MAX; a clear error otherwise (argparse shows it)."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"zoom must be MIN,MAX (e.g. 0.3,3), got {text!r}") from None
    if not 0 < low <= high <= 16:
        raise argparse.ArgumentTypeError(f"zoom needs 0 < MIN <= MAX <= 16, got {low:g},{high:g}")
    return low, high


ZOOM_SHARE = 0.5  # of real tiles rescaled when zoom is on; the rest stay at the scale the device sees


class TileSampler:
    """Random tiles: around a defect (positive) or away from every defect (negative).

    With `zoom` (MIN, MAX) != (1, 1), half of the real tiles are cut from a window 1/z times the tile
    and resized to it, z log-uniform in [MIN, MAX] (boxes scaled with it): defects larger than a tile
    (GDXray's validation series reach 300 px) fit into one, small ones are seen larger, and the
    background is seen at the same scales, so a zoomed-out tile is not mistaken for a defect.
    """

    def __init__(
        self,
        images: list[LoadedImage],
        size: int,
        pad: float,
        rng: np.random.Generator,
        zoom: tuple[float, float] = (1.0, 1.0),
    ) -> None:
        self.size = size
        self.pad = pad
        self.rng = rng
        self.zoom = zoom
        self.defective = [im for im in images if im.annotated and len(im.boxes)]
        # Unannotated images may hide defects: usable only where training is unsupervised.
        self.normal_sources = [im for im in images if im.annotated]
        self.any_sources = images
        # Optional extra positives (e.g. simulated defects, export.simulate) drawn with this share.
        self.extra_positives: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None
        self.extra_share = 0.0

    def _origin(self, im: LoadedImage, window: int) -> tuple[int, int]:
        h, w = im.unit.shape
        return int(self.rng.integers(0, max(1, h - window + 1))), int(self.rng.integers(0, max(1, w - window + 1)))

    def _scale(self) -> float:
        """1.0, or (with zoom on, for ZOOM_SHARE of the tiles) a factor drawn log-uniformly from the range."""
        low, high = self.zoom
        if (low, high) == (1.0, 1.0) or self.rng.random() >= ZOOM_SHARE:
            return 1.0
        return float(np.exp(self.rng.uniform(np.log(low), np.log(high))))

    def _resized(self, crop: np.ndarray) -> np.ndarray:
        if crop.shape[0] == self.size:
            return crop
        shrink = crop.shape[0] > self.size
        return cv2.resize(crop, (self.size, self.size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)

    def positive(self) -> tuple[np.ndarray, np.ndarray]:
        if self.extra_positives is not None and self.rng.random() < self.extra_share:
            return self.extra_positives()
        if not self.defective:
            raise DatasetError("no annotated defective image in the training set")
        im = self.defective[int(self.rng.integers(len(self.defective)))]
        box = im.boxes[int(self.rng.integers(len(im.boxes)))]
        h, w = im.unit.shape
        bw, bh = box[2] - box[0], box[3] - box[1]
        scale = self._scale()
        if scale != 1.0 and max(bw, bh) * scale > 0.9 * self.size and self.zoom[0] < 1.0:
            scale = max(self.zoom[0], 0.9 * self.size / max(bw, bh))  # shrink a too-large defect into the tile
        s = max(1, round(self.size / scale))  # the window cut from the image, resized to the tile
        # Any origin that keeps the box inside the window (or centred when the box is larger).
        lo_x, hi_x = int(np.floor(box[2] - s)) if bw < s else int(box[0] + bw / 2 - s / 2), int(box[0])
        lo_y, hi_y = int(np.floor(box[3] - s)) if bh < s else int(box[1] + bh / 2 - s / 2), int(box[1])
        x = int(self.rng.integers(min(lo_x, hi_x), max(lo_x, hi_x) + 1))
        y = int(self.rng.integers(min(lo_y, hi_y), max(lo_y, hi_y) + 1))
        x = int(np.clip(x, 0, max(0, w - s)))
        y = int(np.clip(y, 0, max(0, h - s)))
        boxes = boxes_in_tile(im.boxes, y, x, s) * np.float32(self.size / s)
        return self._resized(_cut(im.unit, y, x, s, self.pad)), boxes

    def negative(self, include_unannotated: bool = False) -> np.ndarray:
        sources = self.any_sources if include_unannotated else self.normal_sources
        if not sources:
            raise DatasetError("no usable defect-free image region in the training set")
        s = max(1, round(self.size / self._scale()))
        for _ in range(50):
            im = sources[int(self.rng.integers(len(sources)))]
            y, x = self._origin(im, s)
            if not _overlaps_any(im.boxes, y, x, s):
                return self._resized(_cut(im.unit, y, x, s, self.pad))
        # Every try hit a defect: fall back to a tile of the least-defective image's corner.
        im = min(sources, key=lambda i: len(i.boxes))
        return _cut(im.unit, 0, 0, self.size, self.pad)


def augment(tile: np.ndarray, boxes: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flips and 90-degree rotations (defects have no preferred orientation), then exposure jitter."""
    s = tile.shape[0]
    boxes = boxes.copy()
    if rng.random() < 0.5:
        tile = tile[:, ::-1]
        boxes[:, [0, 2]] = s - boxes[:, [2, 0]]
    if rng.random() < 0.5:
        tile = tile[::-1, :]
        boxes[:, [1, 3]] = s - boxes[:, [3, 1]]
    if rng.random() < 0.5:
        tile = tile.T
        boxes = boxes[:, [1, 0, 3, 2]]
    # Exposure differs from series to series (tube settings, detector gain): vary contrast, level
    # and gamma widely so the models do not learn one series' grey levels.
    gamma = np.float32(np.exp(rng.uniform(-0.35, 0.35)))
    gain = np.float32(rng.uniform(0.7, 1.3))
    offset = np.float32(rng.uniform(-0.15, 0.15))
    tile = np.clip(np.power(np.clip(tile, 0.0, 1.0), gamma) * gain + offset, 0.0, 1.0)
    return np.ascontiguousarray(tile, dtype=np.float32), boxes


def intensity_stats(images: list[LoadedImage], rng: np.random.Generator) -> tuple[float, float]:
    """Mean and std of windowed pixels over a sample of the training images."""
    picks = rng.choice(len(images), size=min(len(images), 64), replace=False)
    values = np.concatenate([images[i].unit[::4, ::4].ravel() for i in picks])
    return float(values.mean()), float(max(values.std(), 1e-3))
