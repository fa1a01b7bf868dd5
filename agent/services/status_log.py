"""A periodic one-line summary in the journal: throughput, errors, drops, queue, bundle.

A box runs for months; this is what maintenance reads first (`journalctl -u lineside-agent`), and the
simplest proof that frames still flow. It reads only the agent's status snapshot.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from lineside.agent.plugins import StrictConfig

if TYPE_CHECKING:
    from lineside.agent.runtime import Agent

logger = logging.getLogger(__name__)


class StatusLogConfig(StrictConfig):
    """The periodic status line."""

    interval_s: float = Field(
        default=600.0, ge=0, description="Seconds between two status lines in the log; 0 turns them off."
    )


class StatusLogService:
    """Logs the agent's counters every `interval_s` seconds on its own thread."""

    section: ClassVar[str] = "status_log"
    config_class: ClassVar[type[StrictConfig]] = StatusLogConfig
    name = "status_log"

    def __init__(self, agent: Agent, interval_s: float) -> None:
        self.agent = agent
        self.interval_s = interval_s
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_frames = 0

    @classmethod
    def from_agent(cls, agent: Agent) -> StatusLogService | None:
        config: StatusLogConfig = agent.config.status_log
        return cls(agent, config.interval_s) if config.interval_s > 0 else None

    def start(self, stop: threading.Event) -> None:
        self._stop = stop
        self._thread = threading.Thread(target=self._run, name="lineside-status-log", daemon=True)
        self._thread.start()

    def line(self) -> str:
        """The status line for the current snapshot."""
        status = self.agent.status()
        counters = status.counters
        frames = int(counters.get("frames_in", 0))
        rate = (frames - self._last_frames) / self.interval_s
        self._last_frames = frames
        drops = sum(counters.get("drops_by_reason", {}).values())
        return (
            f"status: {status.state}, bundle {status.bundle_version}, {rate:.2f} frames/s, "
            f"{frames} frames, {counters.get('results_out', 0)} results, {counters.get('errors', 0)} errors, "
            f"{drops} drops, queue {counters.get('queue_depth', 0)}, "
            f"last progress {status.last_progress_age_s:.1f} s ago"
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            logger.info("%s", self.line())

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
