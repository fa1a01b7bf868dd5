"""Amazon Lookout for Vision / SageMaker Ground Truth manifests (JSON Lines), local or on S3.

The line format lives in `agent.lfv_manifest` (the agent writes it for flagged images). Here:
- label: `class-name` of the classification; without one, boxes present -> defective, an empty
  box list -> normal, neither -> unknown.
- annotated: a person made the label (`human-annotated: yes`); machine flags are not ground truth.
- group: `lineside-part-id` if present, else the name of the image's parent folder (or the bucket).
  Parts that happen to share a folder name are merged into one group, which can only make splits
  coarser, never leak a part across them.
- relative `source-ref`s resolve against the manifest's folder (or S3 prefix).
- many manifests (`read_manifests`: every `.manifest`/`.jsonl` under a local folder or an S3 prefix, e.g.
  the agent's flagged uploads, one manifest per image) form one data set. An image listed by several
  manifests keeps the human label over a machine one (a labelling job's output beside the uploads); two
  labels of the same kind for one image are an error naming both. In a local folder (e.g. a copy made
  with `aws s3 sync`), an `s3://` source-ref whose file lies beside its manifest is read from there, so
  a synced copy trains offline.

Machine labels (the agent's flags, `human-annotated: no`) are read with `annotated=False`: training uses
them where unverified images are allowed (the VAE's mostly-normal tiles), never as verified defects or
normals, and evaluation ignores them. A person confirms them in a labelling job, which writes
`human-annotated: yes`.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lineside.agent.errors import DatasetError
from lineside.agent.lfv_manifest import ManifestLine, build_line, parse_line, to_line
from lineside.agent.storage import s3_client, split_s3_uri
from lineside.export.data.base import Box, Dataset, Sample, clip_box, image_size, read_bytes

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".manifest", ".jsonl")
_S3_READERS = 8  # manifests read at once from S3: the uploads hold one small object per image


def read_manifest(location: str | Path) -> Dataset:
    """Read a manifest file (local path or s3:// URI) into a Dataset."""
    text_location = str(location)
    samples = [sample for sample, _where in _read_lines(text_location)]
    if not samples:
        raise DatasetError(f"{text_location}: manifest holds no image lines")
    dataset = Dataset("lfv", text_location, samples)
    logger.info("read %s: %s", text_location, dataset.summary())
    return dataset


def read_manifests(location: str | Path) -> Dataset:
    """Every manifest under a local folder (recursively) or an `s3://bucket/prefix`, as one Dataset.

    See the module docstring for images listed more than once."""
    text = str(location)
    if text.startswith("s3://"):
        bucket, prefix = split_s3_uri(text, key_required=False)
        root = f"s3://{bucket}/{prefix.strip('/')}".rstrip("/")
        locations = [f"s3://{bucket}/{key}" for key in _s3_manifest_keys(bucket, prefix)]
        with ThreadPoolExecutor(_S3_READERS) as pool:
            per_file = list(pool.map(_read_lines, locations))
    else:
        folder = Path(location)
        root = str(folder)
        locations = sorted(
            str(p)
            for p in folder.rglob("*")
            if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES and not p.name.startswith(".")
        )
        per_file = [_read_lines(loc, prefer_beside=True) for loc in locations]
    if not locations:
        raise DatasetError(f"{root}: no {' or '.join(MANIFEST_SUFFIXES)} manifest under it")
    chosen: dict[str, tuple[Sample, str]] = {}
    for lines in per_file:
        for sample, where in lines:
            kept = chosen.get(sample.uri)
            if kept is None or (sample.annotated and not kept[0].annotated):
                chosen[sample.uri] = (sample, where)
            elif sample.annotated == kept[0].annotated:
                raise DatasetError(f"{where}: image {sample.uri} already listed at {kept[1]}")
    if not chosen:
        raise DatasetError(f"{root}: the {len(locations)} manifest(s) under it hold no image lines")
    dataset = Dataset("lfv", root, [sample for sample, _where in chosen.values()])
    logger.info("read %d manifest(s) under %s: %s", len(locations), root, dataset.summary())
    return dataset


def _s3_manifest_keys(bucket: str, prefix: str) -> list[str]:
    start = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    keys: list[str] = []
    try:
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start):
            keys.extend(
                item["Key"]
                for item in page.get("Contents", [])
                if item["Key"].lower().endswith(MANIFEST_SUFFIXES)
                and not posixpath.basename(item["Key"]).startswith(".")
            )
    except Exception as err:
        if type(err).__module__.startswith(("botocore", "boto3")):
            raise DatasetError(f"s3://{bucket}/{start}: cannot list the prefix ({err})") from err
        raise
    return sorted(keys)


def _read_lines(text_location: str, *, prefer_beside: bool = False) -> list[tuple[Sample, str]]:
    """(sample, 'file:line') of every image line of one manifest; duplicates within it are an error.

    `prefer_beside` (a local manifest): an s3:// ref whose file name lies beside the manifest is read there."""
    try:
        text = read_bytes(text_location).decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{text_location}: manifest is not UTF-8 text ({err})") from err
    found: list[tuple[Sample, str]] = []
    seen: dict[str, int] = {}
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{text_location}:{line_no}"
        line = parse_line(raw, where)
        uri = resolve_ref(text_location, line.source_ref)
        if prefer_beside and uri.startswith("s3://"):
            beside = Path(text_location).parent / posixpath.basename(uri)
            uri = str(beside) if beside.is_file() else uri
        if uri in seen:
            raise DatasetError(f"{where}: image {uri} already listed on line {seen[uri]}")
        seen[uri] = line_no
        found.append((_sample(line, uri, where), where))
    return found


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
