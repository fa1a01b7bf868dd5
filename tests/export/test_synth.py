"""The synthetic X-ray generator: determinism, layout, boxes, defect share, bit depth, appearance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lineside.agent.errors import DatasetError
from lineside.agent.imaging import read_image, to_unit_range
from lineside.export.data import open_dataset
from lineside.export.synth import SynthSummary, generate

SMALL = (192, 256)  # (height, width), as the synth_set fixture


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    # given two runs with the same arguments
    generate(tmp_path / "a", 6, seed=5, size=SMALL, images_per_series=3)
    generate(tmp_path / "b", 6, seed=5, size=SMALL, images_per_series=3)

    # when both trees are read
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")

    # then they hold the same files with the same bytes
    assert sorted(a) == sorted(b)
    assert len([n for n in a if n.endswith(".png")]) == 6
    assert a == b


def test_different_seeds_give_different_images(tmp_path: Path) -> None:
    # given
    generate(tmp_path / "a", 2, seed=1, size=SMALL)
    generate(tmp_path / "b", 2, seed=2, size=SMALL)

    # when
    a = read_image(tmp_path / "a" / "Castings" / "S0001" / "S0001_0001.png")
    b = read_image(tmp_path / "b" / "Castings" / "S0001" / "S0001_0001.png")

    # then
    assert not np.array_equal(a, b)


def test_output_is_read_by_the_gdxray_reader_with_tight_boxes_of_10_to_40_px(
    synth_set: tuple[Path, SynthSummary],
) -> None:
    # given
    root, summary = synth_set

    # when
    dataset = open_dataset(root)

    # then every image is there, grouped by series, every box lies inside its image and is 10-40 px
    assert dataset.name == "gdxray"
    assert dataset.groups() == ["S0001", "S0002", "S0003", "S0004"]
    assert len(dataset.samples) == summary.images == 24
    assert sum(len(s.boxes) for s in dataset.samples) == summary.boxes > 0
    for sample in dataset.samples:
        height, width = sample.load().shape
        assert (height, width) == SMALL
        assert sample.annotated and sample.label == bool(sample.boxes)
        for box in sample.boxes:
            assert 0 <= box.x1 < box.x2 <= width and 0 <= box.y1 < box.y2 <= height
            assert 10 <= box.width <= 40 and 10 <= box.height <= 40, (sample.name, box)


def test_every_series_has_a_ground_truth_file_and_the_defect_free_share_is_exact(tmp_path: Path) -> None:
    # given a run where 30% of 20 images must be defect-free, with series of 4 images
    summary = generate(tmp_path, 20, seed=3, size=SMALL, defect_free_share=0.3, images_per_series=4)

    # when
    dataset = open_dataset(tmp_path)

    # then
    series = sorted(p for p in (tmp_path / "Castings").iterdir() if p.is_dir())
    assert [p.name for p in series] == ["S0001", "S0002", "S0003", "S0004", "S0005"]
    assert all((p / "ground_truth.txt").is_file() for p in series)
    assert sum(1 for s in dataset.samples if s.label is False) == summary.defect_free_images == 6
    assert summary.defective_images == 14
    assert (tmp_path / "README.md").read_text().startswith("# Synthetic X-ray castings")


def test_defects_change_only_the_pixels_in_their_boxes_and_are_visible(tmp_path: Path) -> None:
    # given the same images rendered once without and once with defects
    generate(tmp_path / "clean", 4, seed=9, size=SMALL, defect_free_share=1.0, part="wheel")
    summary = generate(tmp_path / "defect", 4, seed=9, size=SMALL, defect_free_share=0.0, part="wheel")
    dataset = open_dataset(tmp_path / "defect")
    assert summary.defective_images == 4

    for sample in dataset.samples:
        # when the two renderings are compared
        clean = read_image(tmp_path / "clean" / "Castings" / "S0001" / f"{sample.name}.png").astype(int)
        diff = np.abs(sample.load().astype(int) - clean)

        # then differences above noise lie within the boxes (plus the blur's reach) ...
        inside = np.zeros_like(diff, dtype=bool)
        for box in sample.boxes:
            inside[int(box.y1) - 3 : int(box.y2) + 3, int(box.x1) - 3 : int(box.x2) + 3] = True
        assert diff[~inside].max() <= 4
        # ... and every defect changes its box by a few grey levels at least: low contrast, but visible
        for box in sample.boxes:
            assert diff[int(box.y1) : int(box.y2), int(box.x1) : int(box.x2)].max() >= 3, (sample.name, box)


def test_16_bit_output_decodes_as_uint16_and_spans_the_full_range(tmp_path: Path) -> None:
    # given the same image written at 8 and 16 bits
    generate(tmp_path / "b8", 1, seed=4, size=SMALL, bit_depth=8)
    generate(tmp_path / "b16", 1, seed=4, size=SMALL, bit_depth=16)

    # when
    image8 = read_image(tmp_path / "b8" / "Castings" / "S0001" / "S0001_0001.png")
    image16 = read_image(tmp_path / "b16" / "Castings" / "S0001" / "S0001_0001.png")

    # then the 16-bit file is uint16 over the full 0-65535 scale and shows the same picture
    assert image16.dtype == np.uint16 and image8.dtype == np.uint8
    assert image16.max() > 180 * 257
    unit_diff = np.abs(to_unit_range(image16) - to_unit_range(image8))
    assert unit_diff.max() <= 1.0 / 255 + 1e-6


def test_default_size_images_look_like_gdxray_radiographs(tmp_path: Path) -> None:
    # when two parts (a wheel and a knuckle series) are rendered at GDXray's size
    generate(tmp_path, 4, seed=21, images_per_series=2)

    # then: dark corners outside the intensifier's field, bright open background, grey metal
    for name in ("S0001/S0001_0001.png", "S0002/S0002_0001.png"):
        image = read_image(tmp_path / "Castings" / name)
        assert image.shape == (572, 768) and image.dtype == np.uint8
        assert image[:20, :20].mean() < 25 and image[-20:, -20:].mean() < 25
        centre = image[143:429, 192:576]
        assert 40 < np.median(centre) < 235
        assert centre.std() > 8  # structure, not a flat field


def test_rerun_into_own_folder_replaces_old_series_but_foreign_folders_are_refused(tmp_path: Path) -> None:
    # given an earlier, larger run and a folder with someone else's files
    generate(tmp_path / "synth", 6, seed=1, size=SMALL, images_per_series=2)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")

    # when
    generate(tmp_path / "synth", 2, seed=1, size=SMALL, images_per_series=2)

    # then
    assert [p.name for p in (tmp_path / "synth" / "Castings").iterdir()] == ["S0001"]
    with pytest.raises(DatasetError, match="not empty"):
        generate(foreign, 2, seed=1, size=SMALL)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"images": 0}, "images must be at least 1"),
        ({"seed": -1}, "seed"),
        ({"size": (64, 256)}, "size"),
        ({"bit_depth": 12}, "bit_depth"),
        ({"defect_free_share": 1.5}, "defect_free_share"),
        ({"images_per_series": 0}, "images_per_series"),
        ({"part": "bolt"}, "part"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    # given
    args: dict[str, object] = {"images": 2, "seed": 0, "size": SMALL, **kwargs}

    # when / then
    with pytest.raises(DatasetError, match=message):
        generate(tmp_path / "out", **args)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_defect_contrast_out_of_range_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="defect_contrast"):
        generate(tmp_path / "s", images=2, seed=0, defect_contrast=0.0)
