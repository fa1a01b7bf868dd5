"""Frame sources. Each plugin file holds its config class and its code; add a source = a file + a line here."""

from __future__ import annotations

from lineside.agent.plugins import config_union, plugin_for, registry
from lineside.agent.sources.base import FrameSource, SourceConfigBase
from lineside.agent.sources.camera import CameraSource, CameraSourceConfig
from lineside.agent.sources.folder import FolderSource, FolderSourceConfig
from lineside.agent.sources.replay import ReplaySource, ReplaySourceConfig

PLUGINS: tuple[type[FrameSource], ...] = (FolderSource, CameraSource, ReplaySource)

SOURCES = registry(PLUGINS, "source")
SourceConfig = config_union(PLUGINS)


def create_source(config: SourceConfigBase, station: str = "") -> FrameSource:
    """Build the source its config's `kind` names (its frames' result ids carry `station`); ConfigError
    for an unknown kind."""
    cls = plugin_for(SOURCES, config, "source", "source")
    return cls(config, station)  # type: ignore[call-arg]


__all__ = [
    "SOURCES",
    "CameraSource",
    "CameraSourceConfig",
    "FolderSource",
    "FolderSourceConfig",
    "FrameSource",
    "ReplaySource",
    "ReplaySourceConfig",
    "SourceConfig",
    "create_source",
]
