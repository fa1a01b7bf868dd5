"""Amazon Lookout for Vision / SageMaker Ground Truth manifests (JSON Lines), local or on S3.

The line format lives in `agent.lfv_manifest` (the agent writes it for flagged images). Here:
- label: `class-name` of the classification; without one, boxes present -> defective, an empty
  box list -> normal, neither -> unknown.
- annotated: a person made the label (`human-annotated: yes`); machine flags are not ground truth.
- group: `lineside-part-id` if present, else the name of the image's parent folder (or the bucket).
  Parts that happen to share a folder name are merged into one group, which can only make splits
  coarser, never leak a part across them.
- relative `source-ref`s resolve against the manifest's folder (or S3 prefix).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterable
from pathlib import Path

from lineside.agent.errors import DatasetError
from lineside.agent.lfv_manifest import ManifestLine, build_line, parse_line, to_line
from lineside.agent.storage import split_s3_uri
from lineside.export.data.base import Box, Dataset, Sample, clip_box, image_size, read_bytes

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".manifest", ".jsonl")


def read_manifest(location: str | Path) -> Dataset:
    """Read a manifest file (local path or s3:// URI) into a Dataset."""
    text_location = str(location)
    try:
        text = read_bytes(text_location).decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{text_location}: manifest is not UTF-8 text ({err})") from err
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{text_location}:{line_no}"
        line = parse_line(raw, where)
        uri = resolve_ref(text_location, line.source_ref)
        if uri in seen:
            raise DatasetError(f"{where}: image {uri} already listed on line {seen[uri]}")
        seen[uri] = line_no
        samples.append(_sample(line, uri, where))
    if not samples:
        raise DatasetError(f"{text_location}: manifest holds no image lines")
    dataset = Dataset("lfv", text_location, samples)
    logger.info("read %s: %s", text_location, dataset.summary())
    return dataset


def resolve_ref(manifest: str, ref: str) -> str:
    """Location of a source-ref: s3:// URIs and absolute paths as given, others relative to the manifest."""
    if ref.startswith("s3://") or Path(ref).is_absolute():
        return ref
    if manifest.startswith("s3://"):
        bucket, key = split_s3_uri(manifest)
        return f"s3://{bucket}/{posixpath.normpath(posixpath.join(posixpath.dirname(key), ref))}"
    return str(Path(manifest).parent / ref)


def _sample(line: ManifestLine, uri: str, where: str) -> Sample:
    boxes: tuple[Box, ...] = ()
    label = line.is_anomaly
    annotated = line.human_verified
    if line.bounding_box is not None:
        size = line.bounding_box.image_size[0]
        boxes = tuple(
            clip_box(Box(a.left, a.top, a.left + a.width, a.top + a.height), (size.width, size.height), where)
            for a in line.bounding_box.annotations
        )
        if label is None:
            label = bool(boxes)
            meta = line.bounding_box_metadata
            annotated = meta is not None and meta.human_annotated == "yes"
    if line.part_id:
        group = line.part_id
    elif uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        group = posixpath.basename(posixpath.dirname(key)) or bucket
    else:
        group = Path(uri).parent.name
    name = posixpath.basename(uri) if uri.startswith("s3://") else Path(uri).name
    return Sample(uri, group, boxes, annotated=annotated, label=label, name=name)


def write_manifest(samples: Iterable[Sample], path: Path, *, creation_date: str | None = None) -> int:
    """Write samples as a local manifest; returns the number of lines.

    Local images under the manifest's folder are written as relative refs (the folder can move), others
    as they are. Samples with boxes need their image size, read from the image header.
    """
    path = Path(path)
    base = path.parent.resolve()
    lines: list[str] = []
    for sample in samples:
        ref = sample.uri
        if not ref.startswith("s3://"):
            resolved = Path(ref).resolve()
            ref = resolved.relative_to(base).as_posix() if resolved.is_relative_to(base) else str(resolved)
        if sample.label is None:
            lines.append(to_line(ManifestLine(source_ref=ref, part_id=sample.group)))
            continue
        size = None
        if sample.boxes:
            size = image_size(Path(sample.uri)) if not sample.uri.startswith("s3://") else _remote_size(sample)
        line = build_line(
            ref,
            anomaly=sample.label,
            boxes=[(b.x1, b.y1, b.x2, b.y2) for b in sample.boxes] if sample.boxes else None,
            image_size=size,
            part_id=sample.group,
            human_annotated=sample.annotated,
            creation_date=creation_date,
        )
        lines.append(to_line(line))
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    tmp.replace(path)
    return len(lines)


def _remote_size(sample: Sample) -> tuple[int, int]:
    image = sample.load()
    return int(image.shape[1]), int(image.shape[0])
