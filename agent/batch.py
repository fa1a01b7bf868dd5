"""Inspecting a fixed set of images outside the daemon: `lineside-agent inspect` and `predict`.

Files are keyed like the hot folder keys them (name + sha256 of the bytes), so a batch run twice into
the same results.jsonl gives every image one line.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import uuid
from pathlib import Path
from typing import Any

from lineside.agent.errors import StoreError
from lineside.agent.imaging import DEFAULT_MAX_PIXELS
from lineside.agent.pipeline import Inspector, inspect_frame
from lineside.agent.results import Frame, FrameError
from lineside.agent.sinks.annotate import AnnotateSink
from lineside.agent.sinks.base import Sink
from lineside.agent.sinks.jsonl import JsonlSink
from lineside.agent.sources.base import error_frame, frame_from_bytes
from lineside.agent.storage import LocalStore, Store

logger = logging.getLogger(__name__)

BATCH_STATION = "local"  # station of ad-hoc inspections; part of their result ids


def frame_for_bytes(
    data: bytes | None,
    name: str,
    source: str,
    *,
    read_error: str | None = None,
    file_name: str | None = None,
    station: str = BATCH_STATION,
) -> Frame:
    """A Frame for an image given by name and bytes, keyed by name + sha256.

    `file_name` (default: `name`) is what annotated copies are named after. An unreadable file gets a
    key of its own (a fresh uuid): two unreadable files of one name are two failures, not one.
    """
    meta: dict[str, Any] = {"file": file_name or name}
    if data is None:
        error = FrameError("unreadable", f"{name}: cannot read ({read_error})")
        key = f"{name}:unreadable:{uuid.uuid4()}"
        return error_frame(error, name=name, source=source, key=key, meta=meta, station=station)
    sha = hashlib.sha256(data).hexdigest()
    return frame_from_bytes(
        data,
        name=name,
        source=source,
        key=f"{name}:{sha}",
        max_pixels=DEFAULT_MAX_PIXELS,
        meta={**meta, "sha256": sha},
        station=station,
    )


def inspect_files(inspector: Inspector, paths: list[Path], sinks: list[Sink]) -> int:
    """Inspect image files in order, each result to every sink; returns how many could not be inspected."""
    errors = 0
    for path in paths:
        try:
            frame = frame_for_bytes(Path(path).read_bytes(), str(path), "inspect", file_name=Path(path).name)
        except OSError as err:
            frame = frame_for_bytes(
                None, str(path), "inspect", read_error=err.strerror or str(err), file_name=Path(path).name
            )
        result = inspect_frame(inspector, frame)
        errors += result.error is not None
        for sink in sinks:
            sink.publish(result, frame)
    return errors


def predict_batch(
    inspector: Inspector, input_store: Store, output_store: Store, *, annotate: bool = True
) -> tuple[int, int]:
    """Inspect every image of `input_store`; write results.jsonl and annotated/*.jpg to `output_store`.

    Returns (images, errors). Outputs are staged locally and uploaded at the end for remote stores.
    """
    local = output_store.root if isinstance(output_store, LocalStore) else None
    with tempfile.TemporaryDirectory(prefix="lineside-predict-") as tmp:
        staging = local or Path(tmp)
        sinks: list[Sink] = [JsonlSink(staging / "results.jsonl")]
        if annotate:
            sinks.append(AnnotateSink(staging / "annotated"))
        images = errors = 0
        try:
            for name in input_store.list_images():
                try:
                    frame = frame_for_bytes(input_store.read(name), name, "predict")
                except StoreError as err:
                    frame = frame_for_bytes(None, name, "predict", read_error=str(err))
                result = inspect_frame(inspector, frame)
                images += 1
                errors += result.error is not None
                for sink in sinks:
                    sink.publish(result, frame)
        finally:
            for sink in sinks:
                sink.close()
        if local is None:
            for path in sorted(p for p in staging.rglob("*") if p.is_file() and not p.name.startswith(".")):
                output_store.write(path.relative_to(staging).as_posix(), path.read_bytes())
    logger.info("predicted %d images, %d errors", images, errors)
    return images, errors
