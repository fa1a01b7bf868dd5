"""The VAE's image score and boxes: exactly what the whole-map definitions give, computed faster."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lineside.agent.models.vae import image_score_from_map, vae_boxes


def _whole_map(anomaly: np.ndarray, quantile: float) -> float:
    """The definition: the k-th smallest value, k = round(q (n - 1)), NaN ordered last."""
    if quantile >= 1.0:
        return float(anomaly.max())
    k = min(anomaly.size - 1, round(quantile * (anomaly.size - 1)))
    return float(np.partition(anomaly.ravel(), k)[k])


def _maps(rng: np.random.Generator) -> list[np.ndarray]:
    heavy = (rng.random((572, 768)) ** 8).astype(np.float32)
    ties = np.round(rng.random((97, 131)) * 3).astype(np.float32)
    with_nan = rng.standard_normal((60, 70)).astype(np.float32)
    with_nan.ravel()[[5, 4100]] = np.nan  # one inside the blocks, one in the tail left out of them
    tail_nan = rng.random((61, 67)).astype(np.float32)
    tail_nan.ravel()[-1] = np.nan
    return [heavy, ties, np.full((40, 50), 0.5, np.float32), with_nan, tail_nan, np.ones((1, 1), np.float32)]


@pytest.mark.parametrize("quantile", [0.0, 0.5, 0.99, 0.999, 0.9995, 0.99999, 1.0])
def test_image_score_is_the_quantile_of_the_whole_map(quantile: float) -> None:
    # given maps with a heavy tail, ties, a flat map, NaNs, and a single pixel
    for anomaly in _maps(np.random.default_rng(3)):
        # when the image score is taken
        ours, expected = image_score_from_map(anomaly, quantile), _whole_map(anomaly, quantile)
        # then it is the very value a partition of the whole map gives
        assert ours == expected or (np.isnan(ours) and np.isnan(expected)), (anomaly.shape, quantile)


def _whole_map_boxes(anomaly: np.ndarray, pixel: float, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """The definition: components of the whole thresholded map, raster order, peak value each."""
    mask = (anomaly >= pixel).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    boxes, scores = [], []
    for label in range(1, count):
        x, y, w, h, area = stats[label]
        if area >= min_area:
            boxes.append((x, y, x + w, y + h))
            scores.append(anomaly[labels == label].max())
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(scores, np.float32)


@pytest.mark.parametrize("min_area", [1, 16, 100])
def test_boxes_are_the_components_of_the_whole_map(min_area: int) -> None:
    rng = np.random.default_rng(min_area)
    smooth = cv2.GaussianBlur(rng.random((572, 768)).astype(np.float32), (0, 0), 6)
    corner = np.zeros((100, 120), np.float32)
    corner[0:3, 0:9] = corner[97:100, 110:120] = corner[50, 60] = 2.0  # marks touching the edges, and one pixel
    maps = [(smooth, float(np.quantile(smooth, q))) for q in (0.9, 0.99, 0.9999)]
    maps += [(corner, 1.0), (np.zeros((30, 40), np.float32), 0.5), (smooth, float(smooth.max()))]
    found = 0
    for anomaly, pixel in maps:
        boxes, scores = vae_boxes(anomaly, pixel, min_area)
        ref_boxes, ref_scores = _whole_map_boxes(anomaly, pixel, min_area)
        np.testing.assert_array_equal(boxes, ref_boxes)
        np.testing.assert_array_equal(scores, ref_scores)
        found += len(boxes)
    assert found > 3
