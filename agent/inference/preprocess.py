"""Manifest preprocessing: pixels -> windowed [0,1] -> tiles or one resized image -> normalised batch.

The export stage trains and evaluates through these same functions, so the device sees exactly the
input the models were trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from lineside.agent.bundle.schema import Preprocessing
from lineside.agent.imaging import to_unit_range


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering [0, length), spread evenly so the last tile ends at the edge."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


@dataclass(frozen=True)
class Layout:
    """Where each batch item came from: tile origins in the scaled image, and the scale factors."""

    origins: tuple[tuple[int, int], ...]  # (y, x) per batch item, scaled-image pixels
    scaled_shape: tuple[int, int]  # (h, w) of the image the tiles were cut from
    scale_y: float  # scaled / original
    scale_x: float
    original_shape: tuple[int, int]

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Map (N, 4) x1,y1,x2,y2 boxes from scaled-image pixels to original pixels, clipped."""
        out = boxes.astype(np.float32, copy=True)
        out[:, [0, 2]] /= self.scale_x
        out[:, [1, 3]] /= self.scale_y
        h, w = self.original_shape
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, w)
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, h)
        return out


def windowed(image: np.ndarray, prep: Preprocessing, bits_stored: int | None = None) -> np.ndarray:
    """uint8/uint16 pixels -> float32 in [0, 1] after the manifest's intensity window."""
    unit = to_unit_range(image, bits_stored)
    low, high = prep.window
    if (low, high) != (0.0, 1.0):
        unit -= np.float32(low)
        unit *= np.float32(1.0 / (high - low))
        np.clip(unit, 0.0, 1.0, out=unit)
    return unit


def layout_for(shape: tuple[int, int], prep: Preprocessing) -> Layout:
    """The tile/resize layout for an image of `shape` (h, w)."""
    h, w = shape
    th, tw = prep.input_size
    if prep.mode == "resize":
        return Layout(((0, 0),), (th, tw), th / h, tw / w, (h, w))
    sh, sw = (max(1, round(h * prep.scale)), max(1, round(w * prep.scale))) if prep.scale != 1.0 else (h, w)
    origins = tuple(
        (y, x) for y in tile_origins(sh, th, prep.tile_overlap) for x in tile_origins(sw, tw, prep.tile_overlap)
    )
    return Layout(origins, (sh, sw), sh / h, sw / w, (h, w))


def scaled_unit(unit: np.ndarray, layout: Layout) -> np.ndarray:
    """The windowed image resized to the layout's scaled shape (no copy when the scale is 1)."""
    sh, sw = layout.scaled_shape
    if (sh, sw) == unit.shape:
        return unit
    return cv2.resize(unit, (sw, sh), interpolation=cv2.INTER_AREA)


class BatchBuilder:
    """Cuts normalised model batches, reusing one buffer per batch shape (no per-frame allocation)."""

    def __init__(self, prep: Preprocessing) -> None:
        self.prep = prep
        self._buffers: dict[int, np.ndarray] = {}

    def _buffer(self, n: int) -> np.ndarray:
        buf = self._buffers.get(n)
        if buf is None:
            th, tw = self.prep.input_size
            buf = np.empty((n, self.prep.channels, th, tw), np.float32)
            self._buffers[n] = buf
        return buf

    def build(self, unit: np.ndarray, layout: Layout) -> np.ndarray:
        """Batch (N, C, th, tw) float32 for `unit` (windowed [0,1] original image). Valid until next call."""
        prep = self.prep
        th, tw = prep.input_size
        scaled = scaled_unit(unit, layout)
        batch = self._buffer(len(layout.origins))
        sh, sw = scaled.shape
        for i, (y, x) in enumerate(layout.origins):
            dst = batch[i, 0]
            ch, cw = min(th, sh - y), min(tw, sw - x)
            if ch < th or cw < tw:
                dst.fill(prep.pad_value)
            dst[:ch, :cw] = scaled[y : y + ch, x : x + cw]
        batch[:, :1] -= np.float32(prep.mean)
        batch[:, :1] *= np.float32(1.0 / prep.std)
        if prep.channels == 3:
            batch[:, 1] = batch[:, 0]
            batch[:, 2] = batch[:, 0]
        return batch


def normalise_tiles(tiles: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """(N, th, tw) windowed tiles -> (N, C, th, tw) model input. Used by training."""
    x = (tiles.astype(np.float32) - np.float32(prep.mean)) * np.float32(1.0 / prep.std)
    x = x[:, None]
    if prep.channels == 3:
        x = np.repeat(x, 3, axis=1)
    return np.ascontiguousarray(x)
