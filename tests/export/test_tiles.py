"""Training tiles with zoom: a rescaled tile must still hold its defects exactly where its boxes say."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from lineside.export import tiles
from lineside.export.tiles import LoadedImage, TileSampler, parse_zoom

SIZE = 256


def _image(box: tuple[int, int, int, int], shape: tuple[int, int] = (600, 800)) -> LoadedImage:
    """Dark background, one bright defect filling `box` (x1, y1, x2, y2)."""
    unit = np.full(shape, 0.2, np.float32)
    x1, y1, x2, y2 = box
    unit[y1:y2, x1:x2] = 0.9
    return LoadedImage("a", "S1", unit, np.asarray([box], np.float32), True, True)


def _bright_extent(tile: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(tile > 0.55)  # the defect is 0.9, the background 0.2: halfway after resizing
    return np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@pytest.fixture
def always_zoom(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiles, "ZOOM_SHARE", 1.0)


def test_a_defect_larger_than_a_tile_is_shrunk_into_one(always_zoom: None) -> None:
    # a 300 x 320 px defect: no 256 px tile at native scale holds it
    sampler = TileSampler([_image((200, 150, 520, 450))], SIZE, 0.2, np.random.default_rng(0), zoom=(0.25, 1.0))
    for _ in range(20):
        tile, boxes = sampler.positive()
        assert tile.shape == (SIZE, SIZE)
        (box,) = boxes
        assert max(box[2] - box[0], box[3] - box[1]) <= 0.9 * SIZE + 1  # it fits, with room around it
        np.testing.assert_allclose(box, _bright_extent(tile), atol=2.0)  # and the box is where the defect is


def test_a_small_defect_is_seen_larger(always_zoom: None) -> None:
    sampler = TileSampler([_image((400, 300, 420, 316))], SIZE, 0.2, np.random.default_rng(1), zoom=(3.0, 3.0))
    tile, boxes = sampler.positive()
    (box,) = boxes
    assert box[2] - box[0] == pytest.approx(60, abs=1.5) and box[3] - box[1] == pytest.approx(48, abs=1.5)
    np.testing.assert_allclose(box, _bright_extent(tile), atol=2.0)


def test_zoomed_background_tiles_stay_clear_of_defects(always_zoom: None) -> None:
    sampler = TileSampler([_image((350, 250, 400, 300))], SIZE, 0.2, np.random.default_rng(2), zoom=(0.4, 2.0))
    for _ in range(30):
        tile = sampler.negative()
        assert tile.shape == (SIZE, SIZE)
        assert tile.max() < 0.55  # nothing of the defect, at any scale


def test_without_zoom_tiles_are_cut_at_the_scale_the_device_sees() -> None:
    image = _image((400, 300, 430, 320))
    sampler = TileSampler([image], SIZE, 0.2, np.random.default_rng(3))
    for _ in range(10):
        tile, boxes = sampler.positive()
        (box,) = boxes
        assert (box[2] - box[0], box[3] - box[1]) == (30, 20)
        np.testing.assert_array_equal(box, _bright_extent(tile))


def test_half_of_the_tiles_are_zoomed_by_default() -> None:
    sampler = TileSampler([_image((400, 300, 420, 320))], SIZE, 0.2, np.random.default_rng(4), zoom=(2.0, 2.0))
    boxes = [sampler.positive()[1][0] for _ in range(200)]
    widths = [float(b[2] - b[0]) for b in boxes]
    zoomed = np.mean(np.isclose(widths, 40, atol=1.5))
    assert 0.35 < zoomed < 0.65 and np.all(np.isclose(widths, 20) | np.isclose(widths, 40, atol=1.5))


@pytest.mark.parametrize("text", ["1", "a,b", "0,2", "2,1", "0.5,20"])
def test_bad_zoom_ranges_are_refused_with_the_reason(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="zoom"):
        parse_zoom(text)
    assert parse_zoom("0.3,3") == (0.3, 3.0)
