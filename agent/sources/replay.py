"""Replays a folder of recorded images as a stream, for soak tests, demos and benchmarks."""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import Field

from lineside.agent.errors import SourceError
from lineside.agent.plugins import path_problems
from lineside.agent.results import Frame, FrameError
from lineside.agent.sources.base import (
    DEFAULT_PATTERNS,
    FrameSource,
    SourceConfigBase,
    error_frame,
    frame_from_bytes,
)

logger = logging.getLogger(__name__)


class ReplaySourceConfig(SourceConfigBase):
    """Recorded images replayed as a stream, for soak tests and benchmarks."""

    kind: Literal["replay"] = Field(description="Selects the replay source.")
    path: Path = Field(description="Folder of images, replayed in name order.")
    patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PATTERNS), min_length=1, description="Glob patterns of images."
    )
    rate_hz: float = Field(default=0.0, ge=0, description="Frames per second; 0 = as fast as the pipeline takes.")
    loop: bool = Field(default=False, description="Start over after the last image.")
    max_frames: int | None = Field(default=None, ge=1, description="Stop after this many frames; None = no limit.")

    def problems(self, key: str) -> list[str]:
        return path_problems(self.path, f"{key}.path")


class ReplaySource(FrameSource):
    """Images of a folder in name order, at `rate_hz`, optionally looping, up to `max_frames`.

    Each image is read and decoded once and the decoded array reused (read-only) in later loops. The
    frame key includes the loop number, so every replayed frame gets its own result id.
    """

    config_class = ReplaySourceConfig
    config: ReplaySourceConfig

    def __init__(self, config: ReplaySourceConfig, station: str = "") -> None:
        super().__init__(config, station)
        self._cache: dict[str, Frame] = {}
        self._names: list[str] = []

    def start(self, stop: threading.Event) -> None:
        super().start(stop)
        if not self.config.path.is_dir():
            raise SourceError(f"replay folder {self.config.path} does not exist or is not a folder")
        patterns = [p.lower() for p in self.config.patterns]
        self._names = sorted(
            p.name
            for p in self.config.path.iterdir()
            if p.is_file()
            and not p.name.startswith(".")
            and any(fnmatch.fnmatchcase(p.name.lower(), pat) for pat in patterns)
        )
        if not self._names:
            raise SourceError(f"replay folder {self.config.path} holds no images matching {self.config.patterns}")
        logger.info("replaying %d images from %s at %s", len(self._names), self.config.path, self._rate_text())

    def _rate_text(self) -> str:
        return f"{self.config.rate_hz:g} Hz" if self.config.rate_hz > 0 else "full speed"

    def _decoded(self, name: str) -> Frame:
        frame = self._cache.get(name)
        if frame is None:
            try:
                data = (self.config.path / name).read_bytes()
            except OSError as err:
                error = FrameError("unreadable", f"{name}: cannot read file ({err.strerror})")
                frame = error_frame(error, name=name, source=self.name, key=f"{name}:unreadable", station=self.station)
                self._cache[name] = frame
                return frame
            sha = hashlib.sha256(data).hexdigest()
            frame = frame_from_bytes(
                data,
                name=name,
                source=self.name,
                station=self.station,
                key=f"{name}:{sha}",
                max_pixels=self.config.max_pixels,
                bits_stored=self.config.bits_stored,
                meta={"file": name, "sha256": sha},
            )
            if frame.image is not None:
                frame.image.setflags(write=False)  # shared by every loop's frames
            self._cache[name] = frame
            return frame
        return replace(frame, decode_ms=0.0)

    def frames(self) -> Iterator[Frame]:
        """Yield frames paced at `rate_hz` until stopped, exhausted, or `max_frames` reached."""
        interval = 1.0 / self.config.rate_hz if self.config.rate_hz > 0 else 0.0
        next_at = time.monotonic()
        sent = 0
        loop = 0
        while not self._stop.is_set():
            for name in self._names:
                if self.config.max_frames is not None and sent >= self.config.max_frames:
                    return
                if interval:
                    # Deadline pacing: a late frame does not push every later frame back.
                    if self.wait(max(0.0, next_at - time.monotonic())):
                        return
                    next_at = max(next_at + interval, time.monotonic() - interval)
                elif self._stop.is_set():
                    return
                self.beat()
                base = self._decoded(name)
                sent += 1
                self.count("frames")
                yield replace(
                    base,
                    frame_id=f"{loop}:{name}",
                    key=f"{loop}:{base.key}",
                    captured_wall=datetime.now(UTC),
                    captured_mono=time.monotonic(),
                    meta={**base.meta, "loop": loop},
                )
            loop += 1
            self.count("loops")
            if not self.config.loop:
                return
