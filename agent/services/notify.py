"""systemd's notify protocol: READY, WATCHDOG, STATUS, RELOADING, STOPPING (the unit is Type=notify).

The protocol is one datagram per message to the AF_UNIX socket named in `$NOTIFY_SOCKET` (a path, or
'@name' for the abstract namespace), so it is spoken directly rather than through a package.

- READY=1 when the agent publishes `started`: the engine is loaded, verified, warmed up and golden-checked,
  the source is open, the pipeline and every other service run.
- WATCHDOG=1 every half `$WATCHDOG_USEC`, but only while the inference loop keeps going round
  (`AgentStatus.last_progress_age_s`; it beats while idle too, so a quiet line is not a hang). A frame
  stuck in the engine or a wedged pipeline stops the heartbeat and systemd restarts the service.
- STATUS= with frames/s, totals and the bundle version, on every tick.
- RELOADING=1 around a bundle swap (`bundle_swapping`), READY=1 again once it took (or failed).
- STOPPING=1 on `stopping`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field

from lineside.agent.plugins import StrictConfig

if TYPE_CHECKING:
    from lineside.agent.events import Event
    from lineside.agent.runtime import Agent

logger = logging.getLogger(__name__)


class NotifyConfig(StrictConfig):
    """systemd notifications; active only when systemd set $NOTIFY_SOCKET (Type=notify)."""

    enabled: bool = Field(default=True, description="Talk to systemd when $NOTIFY_SOCKET is set.")
    status_interval_s: float = Field(
        default=10.0, gt=0, description="Seconds between two STATUS= updates (more often when the watchdog is on)."
    )


def notify_address(value: str) -> str:
    """The socket address for a `$NOTIFY_SOCKET` value: '@name' is the abstract namespace ('\\0name')."""
    return "\0" + value[1:] if value.startswith("@") else value


class Notifier:
    """Sends sd_notify datagrams to one socket; never raises (a failure is logged once)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._lock = threading.Lock()
        self._failed = False

    @classmethod
    def from_environment(cls) -> Notifier | None:
        """A notifier for `$NOTIFY_SOCKET`, or None outside a Type=notify unit."""
        value = os.environ.get("NOTIFY_SOCKET")
        return cls(notify_address(value)) if value else None

    def send(self, *fields: str) -> bool:
        """Send `KEY=value` fields as one message; False when it could not be delivered."""
        message = "\n".join(f.replace("\n", " ") for f in fields).encode()
        with self._lock:
            try:
                self._sock.sendto(message, self.address)
            except OSError as err:
                if not self._failed:
                    logger.warning("systemd notify socket %r refused a message: %s", self.address, err)
                self._failed = True
                return False
        return True

    def close(self) -> None:
        with self._lock:
            self._sock.close()


def watchdog_interval() -> float | None:
    """Half of `$WATCHDOG_USEC` in seconds, or None when systemd runs no watchdog for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        logger.warning("ignoring WATCHDOG_USEC=%r: not a whole number of microseconds", usec)
        return None
    return value / 2e6 if value > 0 else None


class NotifyService:
    """Tells systemd when the agent is ready, alive, reloading or stopping; see the module docstring."""

    section: ClassVar[str] = "notify"
    config_class: ClassVar[type[StrictConfig]] = NotifyConfig
    name = "notify"

    def __init__(self, agent: Agent, notifier: Notifier, config: NotifyConfig, watchdog_s: float | None) -> None:
        self.agent = agent
        self.notifier = notifier
        self.config = config
        self.watchdog_s = watchdog_s  # the ping interval: half of WatchdogSec
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._last: tuple[float, int] | None = None  # (monotonic, frames_in) at the last STATUS
        self._withheld = False

    @classmethod
    def from_agent(cls, agent: Agent) -> NotifyService | None:
        config: NotifyConfig = agent.config.notify
        notifier = Notifier.from_environment() if config.enabled else None
        return None if notifier is None else cls(agent, notifier, config, watchdog_interval())

    def start(self, stop: threading.Event) -> None:
        self._stop = stop
        self._unsubscribe = [self.agent.events.subscribe(self._on_event)]
        self._thread = threading.Thread(target=self._run, name="lineside-notify", daemon=True)
        self._thread.start()
        if self.watchdog_s:
            logger.info("systemd watchdog on: a ping every %.1f s while the inference loop progresses", self.watchdog_s)

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None
        self.notifier.close()

    # -- messages --------------------------------------------------------------------------------

    def status_line(self) -> str:
        """The STATUS= text: frames/s since the last one, totals, bundle version, state."""
        status = self.agent.status()
        counters = status.counters
        frames = int(counters.get("frames_in", 0))
        now = time.monotonic()
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = (frames - self._last[1]) / (now - self._last[0])
        self._last = (now, frames)
        drops = sum(counters.get("drops_by_reason", {}).values())
        paused = ", paused" if status.paused else ""
        return (
            f"{status.state}{paused}: {rate:.1f} frames/s, {frames} frames, {counters.get('errors', 0)} errors, "
            f"{drops} drops, bundle {status.bundle_version}"
        )

    def alive(self) -> bool:
        """True while the inference loop went round within one ping interval (idle waits count)."""
        return self.watchdog_s is not None and self.agent.status().last_progress_age_s < self.watchdog_s

    def _on_event(self, event: Event) -> None:
        # Runs on the publisher's thread: one datagram each, never blocks.
        if event.kind == "started":
            self.notifier.send("READY=1", f"STATUS={self.status_line()}")
        elif event.kind == "bundle_swapping":
            self.notifier.send(
                "RELOADING=1",
                f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                f"STATUS=swapping bundle {event.data.get('old_version')} -> {event.data.get('version')}",
            )
        elif event.kind in ("bundle_changed", "bundle_swap_failed"):
            self.notifier.send("READY=1", f"STATUS={event.message}")
        elif event.kind == "stopping":
            self.notifier.send("STOPPING=1", "STATUS=stopping")

    def _run(self) -> None:
        interval = min(self.config.status_interval_s, self.watchdog_s or self.config.status_interval_s)
        next_status = 0.0
        while not self._stop.wait(interval):
            fields = []
            if self.watchdog_s is not None:
                if self.alive():
                    fields.append("WATCHDOG=1")
                    if self._withheld:
                        logger.info("inference loop progresses again; watchdog pings resumed")
                    self._withheld = False
                elif not self._withheld:
                    self._withheld = True
                    logger.error(
                        "inference loop stalled for %.1f s (bundle %s): withholding the watchdog ping, systemd "
                        "will restart the service",
                        self.agent.status().last_progress_age_s,
                        self.agent.status().bundle_version,
                    )
            if time.monotonic() >= next_status:
                fields.append(f"STATUS={self.status_line()}")
                next_status = time.monotonic() + self.config.status_interval_s
            if fields:
                self.notifier.send(*fields)
