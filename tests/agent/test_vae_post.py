"""The VAE's image score: the map's quantile, exactly as a whole-map partition gives it."""

from __future__ import annotations

import numpy as np
import pytest

from lineside.agent.models.vae import image_score_from_map


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
