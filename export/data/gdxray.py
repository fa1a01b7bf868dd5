"""GDXray Castings layout: `Castings/Cxxxx/Cxxxx_nnnn.png` plus `Cxxxx/ground_truth.txt`.

`ground_truth.txt` holds one box per line, `image_no x1 x2 y1 y2` (both x first, then both y), pixels.
A series with that file is annotated: its images without a line are verified defect-free. A series
without it is not annotated (label None). The group of a sample is its series, since the images of
a series are views of one part. The synthetic data of `export.synth` uses the same layout.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from lineside.agent.errors import DatasetError
from lineside.agent.imaging import IMAGE_SUFFIXES
from lineside.export.data.base import Box, Dataset, Sample, clip_box, image_size

logger = logging.getLogger(__name__)

GROUND_TRUTH = "ground_truth.txt"
_NUMBER = re.compile(r"(\d+)$")


def looks_like(path: Path) -> bool:
    """Whether `path` is a GDXray root, a folder of series folders, or one series folder."""
    if (path / "Castings").is_dir():
        return True
    return bool(_series_dirs(path))


def read_gdxray(root: Path) -> Dataset:
    """Read every series under `root` (see module docstring); boxes are validated against image sizes."""
    root = Path(root)
    series = _series_dirs(root / "Castings" if (root / "Castings").is_dir() else root)
    if not series:
        raise DatasetError(f"{root}: expected GDXray series folders (Cxxxx/ with Cxxxx_nnnn.png images), found none")
    samples: list[Sample] = []
    for folder in series:
        samples.extend(read_series(folder))
    dataset = Dataset("gdxray", str(root), samples)
    logger.info("read %s: %s", root, dataset.summary())
    return dataset


def _series_dirs(path: Path) -> list[Path]:
    """Series folders under `path`, or [path] itself when it directly holds images."""
    if not path.is_dir():
        return []
    if _images(path):
        return [path]
    return sorted(d for d in path.iterdir() if d.is_dir() and _images(d))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_series(folder: Path) -> list[Sample]:
    """The samples of one series folder, with boxes from its ground_truth.txt if there is one."""
    images = _images(folder)
    group = folder.name
    gt_path = folder / GROUND_TRUTH
    if not gt_path.is_file():
        return [Sample(str(p), group, (), annotated=False, label=None, name=p.stem) for p in images]

    by_number: dict[int, Path] = {}
    for p in images:
        match = _NUMBER.search(p.stem)
        if match is None:
            raise DatasetError(
                f"{p}: annotated series need numbered image names like {group}_0001.png to match {gt_path}"
            )
        number = int(match.group(1))
        if number in by_number:
            raise DatasetError(f"{folder}: images {by_number[number].name} and {p.name} share number {number}")
        by_number[number] = p

    boxes: dict[int, list[Box]] = {}
    sizes: dict[int, tuple[int, int]] = {}
    for line_no, number, box in parse_ground_truth(gt_path):
        where = f"{gt_path}:{line_no}"
        image = by_number.get(number)
        if image is None:
            raise DatasetError(f"{where}: box for image {number}, but {folder} has no image numbered {number}")
        if number not in sizes:
            sizes[number] = image_size(image)  # PNG header only: no decoding
        clipped = clip_box(box, sizes[number], where)
        if clipped != box:
            logger.debug("%s: box clipped to the %dx%d image", where, *sizes[number])
        boxes.setdefault(number, []).append(clipped)
    return [
        Sample(str(p), group, tuple(boxes.get(n, ())), annotated=True, label=n in boxes, name=p.stem)
        for n, p in sorted(by_number.items())
    ]


def parse_ground_truth(path: Path) -> list[tuple[int, int, Box]]:
    """(line number, image number, box) per line of a ground_truth.txt; blank lines are skipped."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: cannot read ground truth ({err})") from err
    rows: list[tuple[int, int, Box]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{line_no}"
        if len(fields) != 5:
            raise DatasetError(f"{where}: expected 5 numbers 'image_no x1 x2 y1 y2', found {len(fields)}: {line!r}")
        try:
            number_f, x1, x2, y1, y2 = (float(f) for f in fields)
        except ValueError as err:
            raise DatasetError(f"{where}: expected numbers 'image_no x1 x2 y1 y2', found {line!r}") from err
        if not all(math.isfinite(v) for v in (number_f, x1, x2, y1, y2)):
            raise DatasetError(f"{where}: expected finite numbers, found {line!r}")
        if number_f != int(number_f) or number_f < 1:
            raise DatasetError(f"{where}: image_no must be a positive whole number, found {fields[0]!r}")
        rows.append((line_no, int(number_f), Box(x1, y1, x2, y2)))
    return rows
