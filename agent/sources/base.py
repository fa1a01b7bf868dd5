"""The frame source protocol shared by the folder, camera and replay sources.

A source is driven by the pipeline's capture thread through `frames()`, and told by the dispatch
thread what became of each frame: `ack(frame, ok, reason)` once its result is safely with the sinks,
or `release(frame)` when the frame was dropped without a result and may be offered again.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, ClassVar

from pydantic import Field

from lineside.agent.errors import ImageDecodeError
from lineside.agent.imaging import DEFAULT_MAX_PIXELS, decode_image
from lineside.agent.plugins import Plugin, QueuePolicy, StrictConfig
from lineside.agent.results import Frame, FrameError

DEFAULT_PATTERNS = ["*.png", "*.tif", "*.tiff", "*.jpg", "*.jpeg"]


class SourceConfigBase(StrictConfig):
    """Settings every source has. `default_queue_policy` is the one place a source kind's queue default lives."""

    default_queue_policy: ClassVar[QueuePolicy] = "block"

    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Source name in results; part of every result id, so keep it stable. Default: the kind.",
    )
    bits_stored: int | None = Field(
        default=None, ge=8, le=16, description="Significant bits of 16-bit pixels (e.g. 12); None = all 16."
    )
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        gt=0,
        description="Images with more pixels are refused (decompression bombs).",
    )

    @property
    def source_name(self) -> str:
        return self.name or str(getattr(self, "kind", "source"))


class FrameSource(Plugin, ABC):
    """Base class of frame sources. Thread-safe: `frames()` runs on one thread, `ack`/`release` on another."""

    config_class: ClassVar[type[SourceConfigBase]]

    def __init__(self, config: SourceConfigBase, station: str = "") -> None:
        self.config = config
        self.station = station  # part of every result id
        self.name = config.source_name
        self.kind: str = str(getattr(config, "kind", "source"))
        self.counters: dict[str, int] = {}
        self._counter_lock = threading.Lock()
        self._stop = threading.Event()
        # Monotonic time `frames()` last went round (waits included): a read stuck inside the source
        # stops it, an idle line does not (the pipeline's watchdog reads it).
        self.heartbeat = time.monotonic()

    @property
    def default_queue_policy(self) -> QueuePolicy:
        """What the frame queue does when full, unless the config's `queue.policy` says otherwise."""
        return type(self.config).default_queue_policy

    def start(self, stop: threading.Event) -> None:
        """Open the source; `stop` ends `frames()`. Raises SourceError when the source cannot be opened."""
        self._stop = stop

    @abstractmethod
    def frames(self) -> Iterator[Frame]:
        """Yield frames until the stop event is set or the source is exhausted; every wait has a timeout.

        Call `beat()` at every turn and wait with `wait()`, so the heartbeat shows the source is alive.
        """

    def beat(self) -> None:
        """The source is alive (not stuck in a read)."""
        self.heartbeat = time.monotonic()

    def wait(self, seconds: float, step: float = 1.0) -> bool:
        """Wait up to `seconds` (beating at least every `step`); True when the stop event was set."""
        deadline = time.monotonic() + seconds
        while True:
            self.beat()
            left = deadline - time.monotonic()
            if left <= 0:
                return self._stop.is_set()
            if self._stop.wait(min(step, left)):
                return True

    def ack(self, frame: Frame, ok: bool, reason: FrameError | None = None) -> None:
        """The frame's result was handed to every sink: `ok`, or failed for `reason` (code + message)."""
        self.count("acked_ok" if ok else "acked_failed")

    def release(self, frame: Frame) -> None:
        """The frame was dropped without a result (queue full, shutdown); the source may offer it again."""
        self.count("released")

    def close(self) -> None:
        """Release files, devices and connections. Safe to call twice."""
        return None

    def problem(self) -> str | None:
        """Why the source cannot deliver frames right now (for readiness), or None. Cheap: called per probe."""
        return None

    def count(self, key: str, n: int = 1) -> None:
        """Add `n` to counter `key`."""
        with self._counter_lock:
            self.counters[key] = self.counters.get(key, 0) + n

    def snapshot(self) -> dict[str, int]:
        """A consistent copy of the counters."""
        with self._counter_lock:
            return dict(self.counters)


def frame_from_bytes(
    data: bytes,
    *,
    name: str,
    source: str,
    key: str,
    frame_id: str | None = None,
    max_pixels: int,
    bits_stored: int | None = None,
    part_id: str | None = None,
    view: int | None = None,
    meta: dict[str, Any] | None = None,
    station: str = "",
) -> Frame:
    """Decode image bytes into a Frame; a decode failure gives a Frame with `error` set, never raises."""
    captured_wall, captured_mono = datetime.now(UTC), time.monotonic()
    start = time.perf_counter()
    image = None
    error = None
    try:
        image = decode_image(data, name, max_pixels=max_pixels)
    except ImageDecodeError as err:
        error = FrameError(err.code, str(err))
    decode_ms = (time.perf_counter() - start) * 1000.0
    return Frame(
        frame_id=frame_id or name,
        key=key,
        source=source,
        image=image,
        captured_wall=captured_wall,
        captured_mono=captured_mono,
        part_id=part_id,
        view=view,
        bits_stored=bits_stored,
        error=error,
        decode_ms=decode_ms,
        meta=meta or {},
        station=station,
    )


def error_frame(
    error: FrameError, *, name: str, source: str, key: str, meta: dict[str, Any] | None = None, station: str = ""
) -> Frame:
    """A Frame that carries only why it could not be read."""
    return Frame(
        frame_id=name,
        key=key,
        source=source,
        image=None,
        captured_wall=datetime.now(UTC),
        captured_mono=time.monotonic(),
        error=error,
        meta=meta or {},
        station=station,
    )
