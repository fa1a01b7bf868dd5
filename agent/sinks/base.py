"""The sink protocol: where inspection results go once made."""

from __future__ import annotations

from abc import ABC, abstractmethod

from lineside.agent.results import Frame, InspectionResult


class Sink(ABC):
    """Receives every result, on the pipeline's dispatch thread only (implementations need no lock).

    `durable` sinks hold the record of truth: a frame is acknowledged to its source (e.g. moved to
    done/) only after every durable sink's `publish` returned without raising.
    """

    name: str
    durable: bool = False

    @abstractmethod
    def publish(self, result: InspectionResult, frame: Frame) -> None:
        """Store or forward one result; raise on failure (the pipeline logs and counts it)."""

    def close(self) -> None:
        """Flush and release resources. Safe to call twice."""
        return None
