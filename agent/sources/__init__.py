"""Frame sources: an explicit registry from config `kind` to implementation."""

from __future__ import annotations

from lineside.agent.config import CameraSourceConfig, FolderSourceConfig, ReplaySourceConfig
from lineside.agent.errors import ConfigError
from lineside.agent.sources.base import FrameSource
from lineside.agent.sources.camera import CameraSource
from lineside.agent.sources.folder import FolderSource
from lineside.agent.sources.replay import ReplaySource

SOURCES: dict[str, type[FrameSource]] = {
    "folder": FolderSource,
    "camera": CameraSource,
    "replay": ReplaySource,
}


def create_source(config: FolderSourceConfig | CameraSourceConfig | ReplaySourceConfig) -> FrameSource:
    """Build the source its config's `kind` names; ConfigError for an unknown kind."""
    kind = getattr(config, "kind", None)
    cls = SOURCES.get(str(kind))
    if cls is None:
        raise ConfigError(
            f"unknown source kind {kind!r}; expected one of {sorted(SOURCES)}",
            [f"source.kind: unknown kind {kind!r}, expected one of {sorted(SOURCES)}"],
        )
    return cls(config)  # type: ignore[arg-type]


__all__ = ["SOURCES", "CameraSource", "FolderSource", "FrameSource", "ReplaySource", "create_source"]
