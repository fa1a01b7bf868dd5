"""VAE anomaly localiser: the study's recipe on reconstruction residuals.

squared residual per tile -> stitched (max over overlaps, tile borders ignored) -> kept inside the part
(bundles built since the part-mask lever) -> L2-normalised over the image -> multiplied with the
original for contrast -> Gaussian smoothing -> a high quantile is the image score; pixels above a level
form connected components, which become boxes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from lineside.agent.inference.preprocess import Layout, scaled_unit
from lineside.agent.models.base import KindOutput, KindPost, KindThresholds, ModelKind
from lineside.agent.models.part_mask import NoPartError, part_mask


class VAEPost(KindPost):
    """The study's localization: residual -> L2 normalisation -> x original -> threshold -> components."""

    kind: Literal["vae"] = "vae"
    blur_sigma: float = Field(default=2.0, ge=0, description="Gaussian smoothing of the anomaly map, px.")
    border: int = Field(default=4, ge=0, description="Tile border (px) ignored when stitching maps.")
    image_score_quantile: float = Field(
        default=0.9995, gt=0, le=1, description="Quantile of the anomaly map used as the image score."
    )
    part_mask: bool = Field(
        default=False,
        description="Read the map only inside the casting (agent.models.part_mask), away from its outline and "
        "the field-of-view border, where reconstruction residuals are largest on good parts too.",
    )
    mask_erode: int = Field(default=4, ge=0, le=32, description="Pixels the part mask keeps off the part's edges.")


VAE_RANGE = 4.0  # how far (a factor) set-thresholds may move the VAE's calibrated thresholds


class VAEThresholds(KindThresholds):
    kind: Literal["vae"] = "vae"
    image: float = Field(default=1.0, description="Image anomaly score at or above which the VAE fires.")
    pixel: float = Field(default=1.0, description="Anomaly-map value marking a pixel anomalous.")
    min_area: int = Field(default=16, ge=1, description="Smallest connected component kept as a box, px.")

    def bounds(self) -> dict[str, tuple[float, float]]:
        # Anomaly scores have no natural range: a station may move at most 4x either way from calibration.
        return {
            "image": _around(self.image),
            "pixel": _around(self.pixel),
            "min_area": (1, max(1, self.min_area) * VAE_RANGE * VAE_RANGE),
        }


def _around(value: float) -> tuple[float, float]:
    low, high = value / VAE_RANGE, value * VAE_RANGE
    return (min(low, high), max(low, high))  # a negative calibration keeps low <= high


@dataclass(frozen=True)
class VAEOutput(KindOutput):
    """`anomaly_map` is in original-image pixels."""

    anomaly_map: np.ndarray


def vae_anomaly_map(
    unit: np.ndarray, recon: np.ndarray, post: VAEPost, layout: Layout, tile_hw: tuple[int, int]
) -> np.ndarray:
    """The study's anomaly map, in original pixels.

    squared reconstruction residual per tile -> stitched (max over overlaps, tile borders ignored)
    -> L2-normalised over the image -> multiplied with the original for contrast
    -> Gaussian smoothing.
    """
    scaled = scaled_unit(unit, layout)
    sh, sw = scaled.shape
    th, tw = tile_hw
    residual = np.zeros((sh, sw), np.float32)
    b = post.border
    for i, (y, x) in enumerate(layout.origins):
        ch, cw = min(th, sh - y), min(tw, sw - x)
        diff = recon[i, 0, :ch, :cw] - scaled[y : y + ch, x : x + cw]
        sq = diff * diff
        # Ignore a tile's outer border: convolutions reconstruct worst there. Inside the image an
        # overlapping tile covers it; at the image edge those few pixels are given up.
        top, left, bottom, right = b, b, ch - b, cw - b
        region = residual[y + top : y + bottom, x + left : x + right]
        np.maximum(region, sq[top:bottom, left:right], out=region)
    if post.part_mask:
        # No casting found (an empty or saturated frame): read the whole map rather than nothing.
        with contextlib.suppress(NoPartError):
            residual *= part_mask(scaled, erode=post.mask_erode)
    # L2 normalisation, scaled by sqrt(pixels) so the map's level does not depend on image size.
    norm = float(np.sqrt(np.sum(residual.astype(np.float64) ** 2) / residual.size))
    anomaly = residual / max(norm, 1e-12) * scaled
    if post.blur_sigma > 0:
        anomaly = cv2.GaussianBlur(anomaly, (0, 0), post.blur_sigma)
    oh, ow = layout.original_shape
    if (sh, sw) != (oh, ow):
        anomaly = cv2.resize(anomaly, (ow, oh), interpolation=cv2.INTER_LINEAR)
    return anomaly.astype(np.float32, copy=False)


def image_score_from_map(anomaly: np.ndarray, quantile: float) -> float:
    """A robust maximum of the anomaly map: its value at `quantile` (the k-th smallest, k = q (n - 1))."""
    if quantile >= 1.0:
        return float(anomaly.max())
    flat = anomaly.ravel()
    n = flat.size
    k = min(n - 1, round(quantile * (n - 1)))
    top = n - k  # the answer is the top-th largest value
    if top * 64 > n:
        return float(np.partition(flat, k)[k])
    # Partitioning the whole map cost ~10 ms a frame. The maxima of `top` disjoint blocks are `top`
    # values of the map, so their minimum is at most the top-th largest: every value at or above the
    # answer passes the cut, and the answer is the same element of the (small) candidate set.
    # `~(flat < cut)` keeps NaN too, which np.partition orders last, as in the whole-map partition.
    cut = flat[: top * (n // top)].reshape(top, -1).max(axis=1).min()
    candidates = flat[~(flat < cut)]
    i = candidates.size - top
    return float(np.partition(candidates, i)[i])


def vae_boxes(anomaly: np.ndarray, pixel_threshold: float, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary mask -> connected components of at least `min_area` px -> (boxes, peak scores)."""
    above = anomaly >= pixel_threshold
    rows = np.flatnonzero(above.any(axis=1))
    if rows.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    cols = np.flatnonzero(above.any(axis=0))
    # Label only the rectangle that holds every marked pixel: labelling a whole frame costs ~3 ms even
    # when it is empty. Components and their raster order are the same as on the whole frame.
    y0, x0 = int(rows[0]), int(cols[0])
    mask = above[y0 : rows[-1] + 1, x0 : cols[-1] + 1].astype(np.uint8)
    region = anomaly[y0 : rows[-1] + 1, x0 : cols[-1] + 1]
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    boxes, scores = [], []
    for label in range(1, count):
        x, y, w, h, area = stats[label]
        if area < min_area:
            continue
        boxes.append((x0 + x, y0 + y, x0 + x + w, y0 + y + h))
        scores.append(float(region[y : y + h, x : x + w][labels[y : y + h, x : x + w] == label].max()))
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    return np.asarray(boxes, np.float32), np.asarray(scores, np.float32)


class VAE(ModelKind):
    name = "vae"
    output_names = ("reconstruction",)
    post_class = VAEPost
    thresholds_class = VAEThresholds
    localiser = True

    def outputs(self, tensors: dict[str, np.ndarray], unit: np.ndarray, layout: Layout) -> VAEOutput:
        post = self.spec.postprocessing
        assert isinstance(post, VAEPost)
        amap = vae_anomaly_map(unit, tensors["reconstruction"], post, layout, self.spec.preprocessing.input_size)
        return VAEOutput(score=image_score_from_map(amap, post.image_score_quantile), anomaly_map=amap)

    @classmethod
    def boxes(cls, out: KindOutput, thresholds: KindThresholds) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(out, VAEOutput) and isinstance(thresholds, VAEThresholds)
        return vae_boxes(out.anomaly_map, thresholds.pixel, thresholds.min_area)
