"""The sink protocol: where inspection results go once made."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from lineside.agent.plugins import Plugin, StrictConfig
from lineside.agent.results import Frame, InspectionResult


class Sink(Plugin, ABC):
    """Receives every result, on the pipeline's dispatch thread only (implementations need no lock).

    `durable` sinks hold the record of truth: a frame is acknowledged to its source (e.g. moved to
    done/) only after every durable sink's `publish` returned without raising.
    """

    config_class: ClassVar[type[StrictConfig]]
    name: str
    durable: bool = False

    @classmethod
    def from_config(cls, config: Any) -> Sink:
        """Build the sink from its config section."""
        raise NotImplementedError

    @abstractmethod
    def publish(self, result: InspectionResult, frame: Frame) -> None:
        """Store or forward one result; raise on failure (the pipeline logs and counts it)."""

    def close(self) -> None:
        """Flush and release resources. Safe to call twice."""
        return None
