"""One reader interface for every data source: samples with boxes, labels and a group for splitting.

A `Sample` is one image: where it is (local path or s3:// URI), its group (the series or part id:
splits go by group, since the views of one part are not independent), its defect boxes and label.
`annotated=False` marks images nobody verified (e.g. GDXray series without ground truth): use them
as mostly-normal data for unsupervised training, never as verified normals in evaluation.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lineside.agent.errors import DatasetError
from lineside.agent.imaging import DEFAULT_MAX_PIXELS, decode_image

logger = logging.getLogger(__name__)

_s3_lock = threading.Lock()
_s3_clients: dict[int, Any] = {}


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


def split_s3_uri(uri: str) -> tuple[str, str]:
    """('bucket', 'key') of an s3:// URI."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise DatasetError(f"{uri}: expected an S3 URI of the form s3://bucket/key")
    return bucket, key


def s3_client() -> Any:
    """The process's S3 client, made on first use (boto3 honours AWS_ENDPOINT_URL and the usual credentials).

    Keyed by process id: a client must not be shared across fork (e.g. data loader workers).
    """
    pid = os.getpid()
    with _s3_lock:
        client = _s3_clients.get(pid)
        if client is None:
            import boto3  # only S3 data sets need it; local-only installs may lack it

            client = boto3.client("s3")
            _s3_clients.clear()
            _s3_clients[pid] = client
        return client


def reset_s3_client() -> None:
    """Forget the cached client, e.g. after the endpoint or credentials in the environment changed."""
    with _s3_lock:
        _s3_clients.clear()


def read_bytes(uri: str | Path) -> bytes:
    """The bytes of a local file or an s3:// object; a missing one is a DatasetError naming it."""
    text = str(uri)
    if text.startswith("s3://"):
        bucket, key = split_s3_uri(text)
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as err:  # botocore raises ClientError, EndpointConnectionError, NoCredentialsError...
            raise DatasetError(f"{text}: cannot read from S3 ({err})") from err
    try:
        return Path(text).read_bytes()
    except OSError as err:
        raise DatasetError(f"{text}: cannot read file ({err.strerror})") from err


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of a local image: from the PNG header when it is a PNG, else by decoding."""
    try:
        with path.open("rb") as f:
            head = f.read(24)
    except OSError as err:
        raise DatasetError(f"{path}: cannot read file ({err.strerror})") from err
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return int(width), int(height)
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


def open_dataset(location: str | Path) -> Dataset:
    """Open a data set, detecting its layout.

    - a `.manifest` / `.jsonl` file, local or s3:// -> Lookout for Vision manifest (export.data.lfv)
    - a folder with `defective/`, `non-defective/`, `normal/` or `anomaly/` -> study layout
    - a folder with `Castings/`, series folders of images, or a single series folder -> GDXray
    """
    # Imported here: the readers import this module for Box/Sample/Dataset.
    from lineside.export.data import gdxray, lfv, study

    text = str(location)
    if text.startswith("s3://"):
        return lfv.read_manifest(text)
    path = Path(location)
    if not path.exists():
        raise DatasetError(
            f"{path}: no such file or folder; expected a GDXray folder, a study folder "
            "(defective/, non-defective/) or a .manifest/.jsonl file"
        )
    if path.is_file():
        if path.suffix.lower() in lfv.MANIFEST_SUFFIXES:
            return lfv.read_manifest(path)
        raise DatasetError(f"{path}: expected a .manifest or .jsonl manifest file, found {path.suffix!r}")
    if study.looks_like(path):
        return study.read_study(path)
    if gdxray.looks_like(path):
        return gdxray.read_gdxray(path)
    raise DatasetError(
        f"{path}: unknown data set layout; expected Castings/ or series folders with images (GDXray), "
        "defective/ and non-defective/ folders (study), or a .manifest/.jsonl file"
    )
