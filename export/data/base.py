"""One reader interface for every data source: samples with boxes, labels and a group for splitting.

A `Sample` is one image: where it is (local path or s3:// URI), its group (the series or part id:
splits go by group, since the views of one part are not independent), its defect boxes and label.
`annotated=False` marks images nobody verified (e.g. GDXray series without ground truth): use them
as mostly-normal data for unsupervised training, never as verified normals in evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lineside.agent.errors import DatasetError, StoreError
from lineside.agent.imaging import DEFAULT_MAX_PIXELS, decode_image, header_size
from lineside.agent.storage import read_uri

logger = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Box:
    """An axis-aligned defect box in pixels; x2/y2 are the right/bottom edges."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def clip(self, width: float, height: float) -> Box:
        """The part of the box inside a width x height image (may be empty: check `area`)."""
        width, height = float(width), float(height)
        return Box(
            min(max(self.x1, 0.0), width),
            min(max(self.y1, 0.0), height),
            min(max(self.x2, 0.0), width),
            min(max(self.y2, 0.0), height),
        )


@dataclass(frozen=True)
class Sample:
    """One image of a data set.

    `label`: True defective, False normal, None unknown. `annotated`: a person verified the label
    (and the boxes, where there are any).
    """

    uri: str
    group: str
    boxes: tuple[Box, ...]
    annotated: bool
    label: bool | None
    name: str

    def load(self, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        """Decode to a 2-D uint8/uint16 array by agent.imaging rules: training sees what the device sees."""
        return decode_image(read_bytes(self.uri), self.uri, max_pixels=max_pixels)


@dataclass
class Dataset:
    """Samples from one source; `root` is the folder or manifest they came from."""

    name: str
    root: str
    samples: list[Sample] = field(default_factory=list)

    def groups(self) -> list[str]:
        """Group names, sorted."""
        return sorted({s.group for s in self.samples})

    def subset(self, groups: Iterable[str]) -> Dataset:
        """The samples of the given groups; an unknown group name is an error, not an empty result."""
        wanted = set(groups)
        unknown = wanted - set(self.groups())
        if unknown:
            raise DatasetError(f"{self.root}: unknown group(s) {sorted(unknown)}; known: {self.groups()}")
        return Dataset(self.name, self.root, [s for s in self.samples if s.group in wanted])

    def summary(self) -> dict[str, Any]:
        """Counts for logs and reports."""
        annotated = [s for s in self.samples if s.annotated]
        return {
            "name": self.name,
            "root": self.root,
            "images": len(self.samples),
            "groups": len(self.groups()),
            "annotated": len(annotated),
            "defective": sum(1 for s in annotated if s.label is True),
            "normal": sum(1 for s in annotated if s.label is False),
            "unverified": len(self.samples) - len(annotated),
            "boxes": sum(len(s.boxes) for s in self.samples),
        }


def read_bytes(uri: str | Path) -> bytes:
    """The bytes of a local file or an s3:// object (the agent's storage layer, one S3 client per process)."""
    try:
        return read_uri(uri)
    except StoreError as err:
        raise DatasetError(str(err)) from err


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of a local image: from its header (PNG, JPEG) when it has one, else by decoding."""
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
    except OSError as err:
        raise DatasetError(f"{path}: cannot read file ({err.strerror})") from err
    size = header_size(head)
    if size is not None:
        return size
    image = decode_image(read_bytes(path), str(path))
    return int(image.shape[1]), int(image.shape[0])


def clip_box(box: Box, size: tuple[int, int], where: str) -> Box:
    """Clip to the image; a box with nothing left inside it is a DatasetError naming `where`."""
    if box.x2 <= box.x1 or box.y2 <= box.y1:
        raise DatasetError(f"{where}: empty box {_fmt(box)} (needs x1 < x2 and y1 < y2)")
    clipped = box.clip(*size)
    if clipped.width <= 0 or clipped.height <= 0:
        raise DatasetError(f"{where}: box {_fmt(box)} lies outside the {size[0]}x{size[1]} image")
    return clipped


def _fmt(box: Box) -> str:
    return f"x {box.x1:g}..{box.x2:g}, y {box.y1:g}..{box.y2:g}"
