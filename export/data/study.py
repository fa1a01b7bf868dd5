"""Study layout: images sorted into `defective/` and `non-defective/` folders by a person.

    root/defective/P17_001.png      (alias folder name: anomaly/)
    root/non-defective/P17_002.png  (alias folder name: normal/)
    root/groups.json                optional {"P17_001.png": "part-17", ...}: every image must be listed
    root/boxes.json                 optional {"P17_001.png": [[x1, y1, x2, y2], ...]}   (x1, y1 first!)
    root/boxes.txt                  optional lines "P17_001.png x1 x2 y1 y2"            (GDXray order)

Every image is annotated: its folder is its label. Without groups.json the group of an image is the
part of its file stem before the first '_' (the whole stem if there is none), so name files
`<part id>_<view>.png`. Boxes are keyed by file name and may only be given for defective images.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from lineside.agent.errors import DatasetError
from lineside.agent.imaging import IMAGE_SUFFIXES
from lineside.export.data.base import Box, Dataset, Sample, clip_box, image_size

logger = logging.getLogger(__name__)

DEFECTIVE_DIRS = ("defective", "anomaly")
NORMAL_DIRS = ("non-defective", "normal")


def looks_like(path: Path) -> bool:
    """Whether `path` holds at least one of the class folders."""
    return any((path / name).is_dir() for name in DEFECTIVE_DIRS + NORMAL_DIRS)


def read_study(root: Path) -> Dataset:
    """Read a study folder (see module docstring)."""
    root = Path(root)
    entries: list[tuple[Path, bool]] = []
    for names, label in ((DEFECTIVE_DIRS, True), (NORMAL_DIRS, False)):
        for name in names:
            folder = root / name
            if folder.is_dir():
                entries.extend(
                    (p, label) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                )
    if not entries:
        raise DatasetError(f"{root}: expected images in defective/ or non-defective/, found none")
    seen: dict[str, Path] = {}
    for path, _ in entries:
        if path.name in seen:
            raise DatasetError(f"{root}: file name {path.name} appears twice ({seen[path.name]} and {path})")
        seen[path.name] = path

    groups = _read_groups(root / "groups.json", set(seen))
    boxes = _read_boxes(root, set(seen))
    samples = []
    for path, label in entries:
        raw = boxes.get(path.name, [])
        if raw and not label:
            raise DatasetError(f"{raw[0][1]}: boxes given for {path.name}, which is in a non-defective folder")
        size = image_size(path) if raw else (0, 0)
        clipped = tuple(clip_box(box, size, where) for box, where in raw)
        group = groups.get(path.name) if groups else path.stem.split("_", 1)[0]
        samples.append(Sample(str(path), str(group), clipped, annotated=True, label=label, name=path.name))
    dataset = Dataset("study", str(root), samples)
    logger.info("read %s: %s", root, dataset.summary())
    return dataset


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not readable JSON ({err})") from err


def _read_groups(path: Path, names: set[str]) -> dict[str, str]:
    if not path.is_file():
        return {}
    data = _load_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, str) and v for v in data.values()):
        raise DatasetError(f"{path}: expected an object mapping file name to group name (non-empty strings)")
    unknown = sorted(set(data) - names)
    missing = sorted(names - set(data))
    if unknown:
        raise DatasetError(f"{path}: names files that are not in the study: {unknown[:5]}")
    if missing:
        # A partial mapping would silently fall back to file-name groups and could leak a part across splits.
        raise DatasetError(f"{path}: every image needs a group; missing: {missing[:5]}")
    return data


def _read_boxes(root: Path, names: set[str]) -> dict[str, list[tuple[Box, str]]]:
    """File name -> [(box, where)], from boxes.json and/or boxes.txt."""
    boxes: dict[str, list[tuple[Box, str]]] = {}
    json_path = root / "boxes.json"
    if json_path.is_file():
        data = _load_json(json_path)
        if not isinstance(data, dict):
            raise DatasetError(f"{json_path}: expected an object mapping file name to [[x1, y1, x2, y2], ...]")
        for name, items in data.items():
            where = f"{json_path}: {name}"
            if not isinstance(items, list) or not all(
                isinstance(b, list) and len(b) == 4 and all(_finite(v) for v in b) for b in items
            ):
                raise DatasetError(f"{where}: expected a list of [x1, y1, x2, y2] boxes, found {items!r}")
            for b in items:
                boxes.setdefault(name, []).append((Box(*(float(v) for v in b)), where))
    txt_path = root / "boxes.txt"
    if txt_path.is_file():
        try:
            lines = txt_path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DatasetError(f"{txt_path}: cannot read ({err})") from err
        for line_no, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{txt_path}:{line_no}"
            try:
                if len(fields) != 5:
                    raise ValueError
                x1, x2, y1, y2 = (float(f) for f in fields[1:])
                if not all(math.isfinite(v) for v in (x1, x2, y1, y2)):
                    raise ValueError
            except ValueError as err:
                raise DatasetError(f"{where}: expected 'file_name x1 x2 y1 y2', found {line!r}") from err
            boxes.setdefault(fields[0], []).append((Box(x1, y1, x2, y2), where))
    for name, items in boxes.items():
        if name not in names:
            raise DatasetError(f"{items[0][1]}: box for {name}, which is not an image of the study")
    return boxes


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
