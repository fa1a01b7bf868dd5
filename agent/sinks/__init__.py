"""Result sinks: an explicit registry from config `kind` to implementation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lineside.agent.config import AnnotateSinkConfig, JsonlSinkConfig
from lineside.agent.errors import ConfigError
from lineside.agent.sinks.annotate import AnnotateSink
from lineside.agent.sinks.base import Sink
from lineside.agent.sinks.jsonl import JsonlSink

SINKS: dict[str, Callable[[Any], Sink]] = {
    "jsonl": JsonlSink.from_config,
    "annotate": AnnotateSink.from_config,
}


def create_sink(config: JsonlSinkConfig | AnnotateSinkConfig) -> Sink:
    """Build the sink its config's `kind` names; ConfigError for an unknown kind."""
    kind = getattr(config, "kind", None)
    factory = SINKS.get(str(kind))
    if factory is None:
        raise ConfigError(
            f"unknown sink kind {kind!r}; expected one of {sorted(SINKS)}",
            [f"sinks.kind: unknown kind {kind!r}, expected one of {sorted(SINKS)}"],
        )
    return factory(config)


__all__ = ["SINKS", "AnnotateSink", "JsonlSink", "Sink", "create_sink"]
