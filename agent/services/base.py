"""The shape every service shares: started after the pipeline, closed before it, in reverse order."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, ClassVar, Protocol

from lineside.agent.plugins import StrictConfig

if TYPE_CHECKING:
    from lineside.agent.runtime import Agent


class Service(Protocol):
    """A long-lived part of the daemon beside the pipeline (MQTT, uploads, updater, health, notify...).

    `start` returns quickly (it starts its own thread if it needs one) or raises, which aborts the
    agent's start-up; its loops end when `stop` is set. `close` releases everything within the agent's
    stop budget and is safe to call twice. Services read the agent's state through `Agent.status()`
    and talk to the rest through `Agent.events`, never by reaching into each other.

    A service with a queue of its own may also offer `queue_depths() -> dict[str, int]` (quick, never
    blocking: MQTT's outbox); `Agent.status()` gathers them for /metrics and the other readers.
    Likewise `counters() -> dict[str, int]` (monotonic totals: uploads done, evicted, updates rejected),
    exported as `lineside_service_events_total{service, counter}`.
    """

    name: str

    def start(self, stop: threading.Event) -> None: ...

    def close(self) -> None: ...


class ServicePlugin(Protocol):
    """A service class as registered in `services/__init__.py`: its config section and how to build it."""

    section: ClassVar[str]  # the top-level config key, e.g. "mqtt"
    config_class: ClassVar[type[StrictConfig]]

    @classmethod
    def from_agent(cls, agent: Agent) -> Service | None:
        """The service for this agent's config, or None when its section turns it off."""
        ...
