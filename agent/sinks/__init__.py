"""Result sinks. Each plugin file holds its config class and its code; add a sink = a file + a line here."""

from __future__ import annotations

from lineside.agent.plugins import StrictConfig, config_union, plugin_for, registry
from lineside.agent.sinks.annotate import AnnotateSink, AnnotateSinkConfig
from lineside.agent.sinks.base import Sink
from lineside.agent.sinks.jsonl import JsonlSink, JsonlSinkConfig

PLUGINS: tuple[type[Sink], ...] = (JsonlSink, AnnotateSink)

SINKS = registry(PLUGINS, "sink")
SinkConfig = config_union(PLUGINS)


def create_sink(config: StrictConfig) -> Sink:
    """Build the sink its config's `kind` names; ConfigError for an unknown kind."""
    cls = plugin_for(SINKS, config, "sink", "sinks")
    return cls.from_config(config)  # type: ignore[attr-defined]


__all__ = [
    "SINKS",
    "AnnotateSink",
    "AnnotateSinkConfig",
    "JsonlSink",
    "JsonlSinkConfig",
    "Sink",
    "SinkConfig",
    "create_sink",
]
