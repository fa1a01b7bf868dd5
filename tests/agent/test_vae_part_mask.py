"""The VAE's anomaly map read inside the part: the outline and field-of-view border stop dominating it."""

from __future__ import annotations

import numpy as np

from lineside.agent.bundle.schema import Preprocessing
from lineside.agent.inference.preprocess import layout_for
from lineside.agent.models.part_mask import part_mask
from lineside.agent.models.vae import VAEPost, vae_anomaly_map

TILE = 64


def _radiograph() -> np.ndarray:
    """A 128x192 unit image: black outside the field of view (left band), free air (bright, right band),
    and a grey casting between them."""
    unit = np.full((128, 192), 0.9, np.float32)  # free air
    unit[:, :24] = 0.02  # outside the field of view
    unit[16:112, 40:160] = 0.45  # the casting
    return unit


def _recon(unit: np.ndarray, layout, defect: tuple[int, int]) -> np.ndarray:
    """Tiles of a 'reconstruction' that misses the field-of-view border badly and a small defect slightly."""
    target = unit.copy()
    target[:, 20:28] += 0.5  # large residual where the detector's border is
    y, x = defect
    target[y - 3 : y + 3, x - 3 : x + 3] += 0.2  # the defect the map should point at
    tiles = np.zeros((len(layout.origins), 1, TILE, TILE), np.float32)
    for i, (ty, tx) in enumerate(layout.origins):
        patch = target[ty : ty + TILE, tx : tx + TILE]
        tiles[i, 0, : patch.shape[0], : patch.shape[1]] = patch
    return tiles


def test_part_mask_keeps_the_casting_and_drops_air_and_the_black_border() -> None:
    mask = part_mask(_radiograph(), erode=4)
    assert mask[64, 100]  # inside the casting
    assert not mask[64, 10] and not mask[64, 180]  # field-of-view black, free air
    assert not mask[64, 41]  # kept off the part's edge by the erosion


def test_with_the_mask_the_map_peaks_at_the_defect_not_at_the_border() -> None:
    unit = _radiograph()
    prep = Preprocessing(mode="tile", input_size=(TILE, TILE), tile_overlap=16, channels=1, mean=0.5, std=0.25)
    layout = layout_for(unit.shape, prep)
    recon = _recon(unit, layout, defect=(60, 100))

    plain = vae_anomaly_map(unit, recon, VAEPost(border=0), layout, (TILE, TILE))
    masked = vae_anomaly_map(unit, recon, VAEPost(border=0, part_mask=True), layout, (TILE, TILE))

    # without the mask the strongest response sits on the border band (x 20-28, inside the bright air)
    py, px = np.unravel_index(np.argmax(plain), plain.shape)
    assert not (40 <= px < 160), (py, px)
    # with it, at the defect
    my, mx = np.unravel_index(np.argmax(masked), masked.shape)
    assert abs(my - 60) <= 4 and abs(mx - 100) <= 4, (my, mx)


def test_a_frame_without_a_part_still_gets_a_map() -> None:
    flat = np.full((128, 192), 0.5, np.float32)
    prep = Preprocessing(mode="tile", input_size=(TILE, TILE), tile_overlap=16, channels=1, mean=0.5, std=0.25)
    layout = layout_for(flat.shape, prep)
    recon = np.full((len(layout.origins), 1, TILE, TILE), 0.6, np.float32)

    amap = vae_anomaly_map(flat, recon, VAEPost(part_mask=True), layout, (TILE, TILE))

    assert amap.shape == flat.shape and np.isfinite(amap).all() and amap.max() > 0
