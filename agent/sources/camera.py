"""A live camera or frame grabber read with OpenCV, reconnecting with exponential backoff."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field, model_validator

from lineside.agent.plugins import QueuePolicy
from lineside.agent.results import Frame
from lineside.agent.sources.base import FrameSource, SourceConfigBase

logger = logging.getLogger(__name__)


def _open_capture(uri: int | str) -> cv2.VideoCapture:
    if isinstance(uri, int):
        return cv2.VideoCapture(uri)
    if "!" in uri:
        return cv2.VideoCapture(uri, cv2.CAP_GSTREAMER)
    return cv2.VideoCapture(uri)


def _redact(uri: int | str) -> str:
    """The URI without a password, for logs."""
    text = str(uri)
    if "://" in text and "@" in text:
        scheme, rest = text.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return text


def to_grey(image: np.ndarray) -> np.ndarray:
    """BGR/BGRA/single-channel frames to a 2-D grey array (8 or 16 bit kept)."""
    if image.ndim == 2:
        return image
    if image.shape[2] == 1:
        return image[:, :, 0]
    code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
    return cv2.cvtColor(image, code)


class CameraSourceConfig(SourceConfigBase):
    """A live camera or frame grabber read through OpenCV."""

    default_queue_policy: ClassVar[QueuePolicy] = "drop_oldest"

    kind: Literal["camera"] = Field(description="Selects the live camera source.")
    uri: int | str = Field(
        description="Device index (0), RTSP/HTTP URL, or a GStreamer pipeline (a string containing '!')."
    )
    fps_limit: float = Field(default=0.0, ge=0, description="Deliver at most this many frames per second; 0 = all.")
    reconnect_min_s: float = Field(default=0.5, gt=0, description="First delay before reconnecting, seconds.")
    reconnect_max_s: float = Field(default=30.0, gt=0, description="Longest delay between reconnects, seconds.")
    max_read_failures: int = Field(
        default=3, ge=1, description="Consecutive failed reads after which the camera is reopened."
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> CameraSourceConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) must be at least reconnect_min_s ({self.reconnect_min_s})"
            )
        return self


class CameraSource(FrameSource):
    """Frames from `cv2.VideoCapture`; a lost stream is reopened, waiting reconnect_min_s .. reconnect_max_s.

    Counters: frames, reconnects, read_failures, open_failures, fps_skipped.
    """

    config_class = CameraSourceConfig
    config: CameraSourceConfig

    def __init__(self, config: CameraSourceConfig, station: str = "") -> None:
        super().__init__(config, station)
        self._capture: cv2.VideoCapture | None = None
        self._seq = 0
        # Sequence numbers restart with the process; the start time keeps frame keys unique across runs.
        self._session = time.time_ns()

    def _connect(self) -> bool:
        self._release_capture()
        capture = _open_capture(self.config.uri)
        if not capture.isOpened():
            capture.release()
            self.count("open_failures")
            return False
        self._capture = capture
        return True

    def _release_capture(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None

    def frames(self) -> Iterator[Frame]:
        """Yield grey frames until stopped; reconnects forever with exponential backoff."""
        delay = self.config.reconnect_min_s
        failures = 0
        min_interval = 1.0 / self.config.fps_limit if self.config.fps_limit > 0 else 0.0
        last_sent = float("-inf")
        first = True
        while not self._stop.is_set():
            self.beat()
            if self._capture is None:
                if not first:
                    self.count("reconnects")
                first = False
                if not self._connect():
                    logger.warning("camera %s: cannot open; retrying in %.1f s", _redact(self.config.uri), delay)
                    self.wait(delay)
                    delay = min(delay * 2.0, self.config.reconnect_max_s)
                    continue
                logger.info("camera %s opened", _redact(self.config.uri))
                failures = 0
            assert self._capture is not None
            ok, image = self._capture.read()
            if not ok or image is None:
                self.count("read_failures")
                failures += 1
                if failures >= self.config.max_read_failures:
                    logger.warning(
                        "camera %s: %d failed reads; reconnecting in %.1f s",
                        _redact(self.config.uri),
                        failures,
                        delay,
                    )
                    self._release_capture()
                    self.wait(delay)
                    delay = min(delay * 2.0, self.config.reconnect_max_s)
                continue
            failures = 0
            delay = self.config.reconnect_min_s
            now = time.monotonic()
            if now - last_sent < min_interval:
                self.count("fps_skipped")
                continue
            last_sent = now
            yield self._frame(image, now)

    def _frame(self, image: np.ndarray, mono: float) -> Frame:
        start = time.perf_counter()
        grey = np.ascontiguousarray(to_grey(image))
        self._seq += 1
        self.count("frames")
        wall = datetime.now(UTC)
        return Frame(
            frame_id=f"{self.name}-{self._seq:08d}",
            key=f"{self._session}:{self._seq}:{time.time_ns()}",
            source=self.name,
            station=self.station,
            image=grey,
            captured_wall=wall,
            captured_mono=mono,
            bits_stored=self.config.bits_stored,
            decode_ms=(time.perf_counter() - start) * 1000.0,
            meta={"seq": self._seq},
        )

    def close(self) -> None:
        self._release_capture()
