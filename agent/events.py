"""The agent's event hook: things a plant should hear about besides results.

Any part publishes (`events.publish("bundle_changed", "...", version=...)`); services subscribe
(MQTT's `event` topic, metrics, logs). Delivery is synchronous on the publisher's thread, so a
subscriber must be quick and never block (queue the event if it has slow I/O to do); a subscriber
that raises is logged and counted, and never reaches the publisher.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)

# Kinds published today; subscribers should pass unknown kinds through rather than fail on them.
EVENT_KINDS = (
    "started",  # the agent serves frames
    "stopping",  # a clean shutdown began
    "bundle_swapping",  # a new engine is about to take over (old_version, version)
    "bundle_changed",  # a new engine took over between two frames
    "bundle_swap_failed",  # the swap did not happen; the old engine still serves
    "thresholds_dropped",  # a swapped-in bundle does not inherit the operator's overrides (old_version, version)
    "frame_error",  # a frame got an error result (code, message)
    "frame_dropped",  # a frame left the pipeline without a result (reason)
    "sink_failed",  # a sink raised on a result
    "service_failed",  # a service could not start or stopped with an error
    "paused",  # inspection paused by a command
    "resumed",  # inspection resumed
    "triggered",  # the next frame was tagged with a part id and view
    "mqtt_refused",  # the MQTT broker refused the connection (credentials, ACL)
    "outbox_evicted",  # the MQTT outbox was full: oldest messages evicted undelivered (count)
    "outbox_rejected",  # the broker refused messages in its acknowledgement (count, reason)
    "upload_failed",  # uploads to S3 fail (bucket, code, message, permanent); once per outage and code
    "upload_resumed",  # uploads work again after an outage (failed_attempts, outage_s, backlog)
    "upload_evicted",  # the upload queue was full: oldest flagged frames evicted unsent (count, total)
    "upload_spool_failed",  # flagged frames could not be queued on local disk (count, total, error)
    "upload_quarantined",  # an unreadable queue item was moved to <queue_dir>/bad/
    "update_available",  # the updates channel names another bundle (channel, bundle_id, version)
    "update_rejected",  # a bundle failed a step (step, reason); the running one keeps serving
    "update_failed",  # the channel could not be read or the download was cut (step, reason, retry_in_s)
    "update_ready",  # a bundle is proven and kept; activate-bundle serves it (updates.auto_activate false)
    "bundle_activated",  # a bundle from the channel or activate-bundle serves now (how, previous_version)
    "bundle_fallback",  # at start the activated bundle failed verification: bundle.path serves (reason)
)


@dataclass(frozen=True)
class Event:
    """One event: a kind from EVENT_KINDS, a human-readable message, and structured fields."""

    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


Subscriber = Callable[[Event], None]


class EventHub:
    """Publish/subscribe between the agent's parts; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []
        self.published = 0
        self.subscriber_failures = 0

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call `subscriber(event)` for every later event; returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            with self._lock:
                if subscriber in self._subscribers:
                    self._subscribers.remove(subscriber)

        return unsubscribe

    def publish(self, kind: str, message: str, **data: Any) -> Event:
        """Deliver an event to every subscriber; never raises."""
        event = Event(kind, message, data)
        with self._lock:
            subscribers = list(self._subscribers)
            self.published += 1
        for subscriber in subscribers:
            try:
                subscriber(event)
            except Exception:
                with self._lock:
                    self.subscriber_failures += 1
                logger.exception("event subscriber %r failed on %s", subscriber, kind)
        return event
