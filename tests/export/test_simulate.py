"""Simulated defects: the attenuation law, tight boxes, the part mask, determinism, copy-paste."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from lineside.agent.errors import DatasetError
from lineside.export.simulate import (
    Background,
    Defect,
    Ellipsoid,
    NoPartError,
    SimConfig,
    SimulatedTiles,
    analyse,
    chord_length_mm,
    cut_residual,
    paste,
    random_defect,
    random_rotation,
    render,
    simulate,
)

Q = 0.05  # grey value of infinite thickness in the synthetic images


def _flat(level: float = 0.5, size: int = 96) -> Background:
    """A noise-free flat image that is all part."""
    unit = np.full((size, size), level, np.float32)
    return Background(unit, unit.copy(), np.ones_like(unit, bool), Q, 0.0)


def _casting(size: int = 160, seed: int = 0) -> np.ndarray:
    """Bright air, a darker disc of metal with a thickness ramp, noise: enough for the part mask."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size]
    unit = np.full((size, size), 0.9, np.float32)
    disc = (ys - size / 2) ** 2 + (xs - size / 2) ** 2 < (0.4 * size) ** 2
    unit[disc] = 0.35 + 0.1 * xs[disc] / size
    return np.clip(unit + rng.normal(0, 0.004, unit.shape), 0, 1).astype(np.float32)


def _sphere(radius_mm: float, mu: float, sign: int = 1, ppm: float = 3.0) -> Defect:
    return Defect("pore" if sign > 0 else "inclusion", (Ellipsoid(0.0, 0.0, (radius_mm,) * 3),), mu, sign, ppm)


def test_void_brightens_centre_pixel_by_exp_mu_chord():
    # given a flat part (I = 0.5) and a sphere of radius 2 mm centred on pixel (48, 48)'s centre
    bg, mu = _flat(0.5), 0.05
    defect = _sphere(2.0, mu)

    # when it is rendered without blur and noise
    image, box = render(bg, defect, 48.5, 48.5, np.random.default_rng(0), blur_sigma=0, noise=False)

    # then the centre pixel follows J = exp(mu * d) (I - q) + q with d the diameter, 4 mm
    assert image[48, 48] == pytest.approx(math.exp(mu * 4.0) * (0.5 - Q) + Q, rel=1e-5)
    # and a pixel 3 px (1 mm) off-centre with the chord 2 * sqrt(r^2 - rho^2)
    chord = 2 * math.sqrt(2.0**2 - 1.0**2)
    assert image[48, 51] == pytest.approx(math.exp(mu * chord) * (0.5 - Q) + Q, rel=1e-5)
    assert image[48, 48] > image[48, 51] > 0.5
    assert box is not None


def test_chord_of_rotated_ellipsoid_matches_analytic_centre_chord():
    # given an ellipsoid with semi-axes (3, 1, 2) mm under a random rotation R
    rotation = random_rotation(np.random.default_rng(4))
    ell = Ellipsoid(10.0, 10.0, (3.0, 1.0, 2.0), rotation)

    # when the ray through its centre is measured
    d = chord_length_mm([ell], np.array([10.0]), np.array([10.0]), px_per_mm=2.0)

    # then it is 2 / sqrt(A_zz), A = R diag(1/a^2) R^T
    a_zz = sum(rotation[2, k] ** 2 / s**2 for k, s in enumerate((3.0, 1.0, 2.0)))
    assert d[0] == pytest.approx(2 / math.sqrt(a_zz), rel=1e-9)


def test_union_of_overlapping_ellipsoids_counts_shared_length_once():
    # given two spheres of radius 1 mm on the same ray, 1 mm apart in depth
    a = Ellipsoid(0.0, 0.0, (1.0, 1.0, 1.0), cz_mm=0.0)
    b = Ellipsoid(0.0, 0.0, (1.0, 1.0, 1.0), cz_mm=1.0)

    # when the chord through both centres is measured
    d = chord_length_mm([a, b], np.array([0.0]), np.array([0.0]), px_per_mm=1.0)

    # then it spans z from -1 to 2, not 2 + 2
    assert d[0] == pytest.approx(3.0)


def test_inclusion_darkens_by_exp_minus_mu_chord():
    # given a flat part and a dense sphere
    bg, mu = _flat(0.6), 0.04
    defect = _sphere(1.5, mu, sign=-1)

    # when rendered without blur and noise
    image, _ = render(bg, defect, 48.5, 48.5, np.random.default_rng(0), blur_sigma=0, noise=False)

    # then the centre gets darker by exactly the law
    assert image[48, 48] == pytest.approx(math.exp(-mu * 3.0) * (0.6 - Q) + Q, rel=1e-5)
    assert image.max() == pytest.approx(0.6)


def test_box_is_tight_around_the_changed_region():
    # given a blurred, noise-free elongated void
    bg = _flat(0.5)
    defect = Defect(
        "pore", (Ellipsoid(0.0, 0.0, (4.0, 1.5, 2.0), random_rotation(np.random.default_rng(1))),), 0.06, 1, 3.0
    )

    # when rendered
    image, box = render(bg, defect, 47.3, 50.8, np.random.default_rng(0), blur_sigma=1.2, noise=False, box_fraction=0.1)

    # then the pixels changing by more than 10 % of the peak lie inside the box and touch all four edges
    change = np.abs(image - bg.unit)
    rows, cols = np.nonzero(change > 0.1 * change.max())
    x1, y1, x2, y2 = box
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x1, y1, x2, y2)


def test_nothing_changes_outside_the_part_mask():
    # given a flat image whose part covers only the left half
    bg = _flat(0.5)
    bg.mask[:, 48:] = False

    # when a large pore straddles the mask edge
    image, _ = render(bg, _sphere(4.0, 0.08), 46.0, 48.0, np.random.default_rng(0), blur_sigma=1.5)

    # then the right half is untouched, the left half changed
    assert np.array_equal(image[:, 48:], bg.unit[:, 48:])
    assert np.abs(image[:, :48] - 0.5).max() > 0.01


def test_simulation_is_deterministic_for_a_seed():
    # given one casting analysed once
    bg = analyse(_casting())

    # when the same seed simulates twice, and another seed once
    a_img, a_boxes = simulate(bg, np.random.default_rng(7), 3)
    b_img, b_boxes = simulate(bg, np.random.default_rng(7), 3)
    c_img, _ = simulate(bg, np.random.default_rng(8), 3)

    # then the first two are identical, and the third differs
    assert np.array_equal(a_img, b_img) and np.array_equal(a_boxes, b_boxes)
    assert len(a_boxes) >= 1
    assert not np.array_equal(a_img, c_img)


def test_simulated_defects_stay_inside_the_part():
    # given a casting: a metal disc in bright air
    bg = analyse(_casting())

    # when defects are simulated
    image, boxes = simulate(bg, np.random.default_rng(3), 3, SimConfig())

    # then air pixels (outside the mask) are unchanged and every box centre lies in the part
    assert np.array_equal(image[~bg.mask], bg.unit[~bg.mask])
    for x1, y1, x2, y2 in boxes:
        assert bg.mask[int((y1 + y2) / 2), int((x1 + x2) / 2)]


def test_image_without_a_part_is_refused_with_a_clear_error():
    # given a flat grey image (no air, no metal edges: nothing that looks like a casting)
    unit = np.full((64, 64), 0.5, np.float32)

    # when / then
    with pytest.raises(NoPartError, match="no part found"):
        analyse(unit)


def test_copy_paste_moves_a_defect_with_its_box():
    # given a flat part with a bright 8x8 defect at (20..28, 20..28)
    unit = np.full((96, 96), 0.5, np.float32)
    unit[20:28, 20:28] += 0.05
    bg = Background(unit, unit.copy(), np.ones_like(unit, bool), Q, 0.0)
    residual = cut_residual(bg, (20.0, 20.0, 28.0, 28.0))

    # when it is pasted centred at (70, 60)
    target = _flat(0.5)
    image, box = paste(target, residual, 70.0, 60.0, np.random.default_rng(0))

    # then the box is 8x8 around there and the image got brighter inside it only
    x1, y1, x2, y2 = box
    assert (x2 - x1, y2 - y1) == (8.0, 8.0)
    assert abs((x1 + x2) / 2 - 70) <= 1 and abs((y1 + y2) / 2 - 60) <= 1
    inside = image[int(y1) : int(y2), int(x1) : int(x2)]
    assert inside.mean() > 0.52
    outside = image.copy()
    outside[int(y1) : int(y2), int(x1) : int(x2)] = 0.5
    assert np.abs(outside - 0.5).max() < 1e-6


def test_simulated_tiles_have_boxes_inside_the_tile():
    # given a sampler of 64 px tiles over two castings
    tiles = SimulatedTiles([("a", _casting(seed=1)), ("b", _casting(seed=2))], 64, 0.5, np.random.default_rng(0))

    # when tiles are drawn
    for _ in range(5):
        tile, boxes = tiles()

        # then each has at least one box, inside the tile
        assert tile.shape == (64, 64) and tile.dtype == np.float32
        assert len(boxes) >= 1
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()


def test_images_without_a_part_are_left_out_counted_and_named(caplog):
    # given two castings and a flat grey frame the part mask finds no part on
    blank = np.full((160, 160), 0.5, np.float32)
    normals = [("a", _casting(seed=1)), ("blank", blank), ("b", _casting(seed=2))]

    # when the simulator is made on them
    with caplog.at_level("WARNING", logger="lineside.export.simulate"):
        tiles = SimulatedTiles(normals, 64, 0.5, np.random.default_rng(0))

    # then it draws on the castings only, and says which image it left out (train.json and the report carry it)
    assert tiles.summary() == {"normals": 3, "backgrounds": 2, "no_part": ["blank"], "copy_paste_defects": 0}
    assert any("no part on 1 of 3" in r.getMessage() and "blank" in r.getMessage() for r in caplog.records)


def test_no_image_with_a_part_is_a_clear_error():
    blank = np.full((160, 160), 0.5, np.float32)

    with pytest.raises(DatasetError, match="found no part on any of the 2 defect-free"):
        SimulatedTiles([("x", blank), ("y", blank.copy())], 64, 0.5, np.random.default_rng(0))


def test_simulation_on_real_gdxray_normal_finds_the_part(gdxray_root):
    # given a verified defect-free GDXray training image (C0001 has none; C0008 holds a few)
    from lineside.agent.imaging import to_unit_range
    from lineside.export.data.gdxray import read_series

    normals = [s for s in read_series(gdxray_root / "Castings" / "C0008") if s.label is False]
    unit = to_unit_range(normals[0].load())

    # when it is analysed and a defect simulated
    bg = analyse(unit)
    _image, boxes = simulate(bg, np.random.default_rng(0), 2)

    # then a sizeable part is found and the boxes are GDXray-sized
    assert bg.mask.mean() > 0.05
    assert len(boxes) >= 1
    sides = np.concatenate([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]])
    assert sides.min() >= 6 and sides.max() <= 80


def test_magnification_scales_the_drawn_defects_and_bounds_them():
    # given the default magnification and one four times larger (a line with more geometric magnification)
    near, far = SimConfig(), SimConfig(px_per_mm=(10.0, 14.0))

    # when many defects are drawn from each
    def sizes(config: SimConfig) -> np.ndarray:
        rng = np.random.default_rng(5)
        return np.asarray([random_defect(rng, config).radius_px() for _ in range(400)])

    # then the median size grows with the magnification, and every draw stays within its range
    ratio = np.median(sizes(far)) / np.median(sizes(near))
    assert 3.0 < ratio < 5.5
    rng = np.random.default_rng(9)
    assert all(10.0 <= random_defect(rng, far).px_per_mm <= 14.0 for _ in range(200))


@pytest.mark.parametrize("text", ["3,1", "0.1,2", "2", "a,b", "2,50"])
def test_a_bad_magnification_range_is_refused_naming_the_flag(text: str):
    import argparse

    from lineside.export.models.base import parse_px_per_mm

    with pytest.raises(argparse.ArgumentTypeError, match="--sim-px-per-mm"):
        parse_px_per_mm(text)


def _projection(defect: Defect) -> tuple[float, float]:
    """(largest chord along the beam, mm; width of the shadow, mm) of one drawn defect."""
    r = defect.radius_px()
    ys, xs = np.mgrid[-r:r:0.5, -r:r:0.5]
    chord = chord_length_mm(defect.ellipsoids, xs, ys, defect.px_per_mm)
    inside = chord > 0
    width_px = max(np.ptp(xs[inside]), np.ptp(ys[inside]))
    return float(chord.max()), float(width_px / defect.px_per_mm)


def test_flat_pores_are_large_in_the_image_but_shallow_along_the_beam():
    # given the simulator drawing every pore flat, and the default (round pores)
    flat, round_ = SimConfig(flat_share=1.0), SimConfig()

    # when many pores are drawn from each
    def depth_over_width(config: SimConfig) -> np.ndarray:
        rng = np.random.default_rng(3)
        return np.asarray([np.divide(*_projection(random_defect(rng, config, "pore"))) for _ in range(200)])

    # then a flat pore's chord is a small share of its shadow's width (it changes the grey value by a few
    # percent however large it looks), a round pore's is about its width, and the depth range is respected
    flat_ratio, round_ratio = depth_over_width(flat), depth_over_width(round_)
    assert np.median(flat_ratio) < 0.3 < 0.7 < np.median(round_ratio)
    assert flat_ratio.max() < 1.0


def test_the_default_draws_are_those_before_flat_pores_and_edge_defects():
    # given the default config (no flat pores, no edge defects) and seeds whose draws were recorded with the
    # simulator before those levers existed (commit 922687b)
    rng = np.random.default_rng(11)

    # when defects are drawn and simulated, then they are the recorded ones: old runs reproduce
    drawn = [random_defect(rng, SimConfig()) for _ in range(3)]
    assert [d.kind for d in drawn] == ["pore", "shrinkage", "pore"]
    assert [round(d.mu_per_mm, 6) for d in drawn] == [0.077282, 0.03784, 0.078113]
    assert tuple(round(a, 6) for a in drawn[2].ellipsoids[0].axes_mm) == (4.010869, 3.91861, 5.405375)
    _, boxes = simulate(analyse(_casting()), np.random.default_rng(7), 3)
    assert boxes.tolist() == [[104.0, 70.0, 118.0, 89.0]]


@pytest.mark.parametrize("text", ["-0.1", "1.5", "half"])
def test_a_bad_flat_share_is_refused(text: str):
    import argparse

    from lineside.export.models.base import parse_share

    with pytest.raises(argparse.ArgumentTypeError, match="share between 0 and 1"):
        parse_share(text)


def _stepped_casting(size: int = 192, seed: int = 0) -> np.ndarray:
    """A metal disc in bright air whose left half is a thick section: a steep edge inside the part at x = size/2."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size]
    unit = np.full((size, size), 0.92, np.float32)
    disc = (ys - size / 2) ** 2 + (xs - size / 2) ** 2 < (0.45 * size) ** 2
    unit[disc] = np.where(xs[disc] < size // 2, 0.25, 0.6)
    unit[(ys + xs < size // 5) | (ys + xs > 2 * size - size // 5)] = 0.02  # no signal outside the field of view
    unit = cv2.GaussianBlur(unit, (0, 0), 1.0)  # the detector's unsharpness: the step spans a few pixels
    return np.clip(unit + rng.normal(0, 0.004, unit.shape), 0, 1).astype(np.float32)


def test_edge_defects_sit_on_steep_edges_inside_the_part_and_never_in_air():
    # given a casting with a steep edge between a thick and a thin section, simulated with every defect on edges
    unit = _stepped_casting()
    config = SimConfig(edge_share=1.0)
    bg, plain = analyse(unit, config), analyse(unit)
    air = unit > 0.85

    # when many defects are simulated
    rng = np.random.default_rng(4)
    boxes = []
    for _ in range(20):
        image, found = simulate(bg, rng, 2, config)
        # then free air never changes
        assert np.array_equal(image[air], unit[air])
        boxes += found.tolist()

    # and the defects lie on the inner step, where the default part mask never puts them
    assert len(boxes) >= 20
    inner_step = sum(1 for x1, _y1, x2, _y2 in boxes if x1 - 4 <= 96 <= x2 + 4)
    assert inner_step / len(boxes) > 0.6
    assert plain.edges is None and not plain.mask[:, 90:102].any()


def test_simulate_preview_draws_edge_and_flat_defects_beside_real_ones(gdxray_root, tmp_path):
    # given the real training series and a simulator drawing every defect on an edge, every pore flat
    from lineside.export.data import datasets_for
    from lineside.export.simulate_preview import render_preview

    _, train, _val, _test, _split = datasets_for(str(gdxray_root), None)
    config = SimConfig.chosen((2.5, 10.0), flat_share=1.0, edge_share=1.0)

    # when the preview is rendered
    sheet = render_preview(train, tmp_path / "preview.png", count=8, seed=2, crop=32, zoom=1, columns=8, config=config)

    # then it labels 8 simulated defects, all on edges, then 8 real ones
    assert len(sheet.labels) == 16
    assert all(" edge " in label for label in sheet.labels[:8]), sheet.labels[:8]
    assert all(label.startswith("real ") for label in sheet.labels[8:])
    # and the grid holds them in two rows of 8 (a cell: crop x zoom, padded 2 px on each side)
    grid = cv2.imread(str(sheet.path))
    assert grid is not None and grid.shape[:2] == (2 * 36, 8 * 36)


def test_a_region_on_an_edge_only_still_gets_edge_defects():
    # given a region of the stepped casting that holds edge pixels but none of the default part mask
    config = SimConfig(edge_share=0.3)
    bg = analyse(_stepped_casting(), config)
    region = (80, 92, 112, 100)
    y0, x0, y1, x1 = region
    assert not bg.mask[y0:y1, x0:x1].any() and bg.edges is not None and bg.edges[y0:y1, x0:x1].any()

    # when defects are simulated with their centres in that region, then they are drawn on the edge
    boxes = np.concatenate([simulate(bg, np.random.default_rng(s), 2, config, region=region)[1] for s in range(5)])
    assert len(boxes) >= 1
    assert all(x1 - 4 <= 96 <= x2 + 4 for x1, _y1, x2, _y2 in boxes)
