"""The one MQTT connection of the agent (paho-mqtt 2.x, CallbackAPIVersion.VERSION2), and the pump that
moves the durable outbox onto it.

- `connect_async` + paho's network thread (`loop_start`): the agent starts whether or not the broker is
  up, and paho reconnects with a backoff between `reconnect_min_s` and `reconnect_max_s`.
- The last will is `status` = offline (retained); every (re)connect publishes `status` = online
  (retained) and subscribes to the command topics; a clean stop publishes `status` = stopped.
- The pump thread hands outbox messages to paho in sequence order, at most `outbox.inflight` unacknowledged
  at once, and deletes each from the outbox when its PUBACK arrives. paho keeps the unacknowledged ones
  across a reconnect and sends them again first (same order, DUP set); after an agent restart everything
  still in the outbox goes out again, with its result id, and the subscriber de-duplicates on it.
- paho's callbacks run on its network thread while it holds its own locks: they only queue work and wake
  the pump, never call back into paho or the outbox (no lock-order deadlock).
"""

from __future__ import annotations

import collections
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from lineside.agent.mqtt.config import MqttConfig
from lineside.agent.mqtt.outbox import Outbox

logger = logging.getLogger(__name__)

CommandHandler = Callable[[mqtt.MQTTMessage], None]


def secure_client(client: mqtt.Client, config: MqttConfig, password: str | None) -> None:
    """Credentials, TLS and reconnect backoff of the config on a paho client (every connection of ours)."""
    if config.username is not None:
        client.username_pw_set(config.username, password)
    if config.tls is not None:
        tls = config.tls
        client.tls_set(
            ca_certs=str(tls.ca_file),
            certfile=None if tls.cert_file is None else str(tls.cert_file),
            keyfile=None if tls.key_file is None else str(tls.key_file),
            cert_reqs=ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(not tls.check_hostname)
    client.reconnect_delay_set(config.reconnect_min_s, config.reconnect_max_s)


class MqttLink:
    """Connection, status, outbox pump and command subscription; see the module docstring."""

    def __init__(
        self,
        config: MqttConfig,
        station: str,
        outbox: Outbox,
        *,
        password: str | None = None,
        offline_payload: bytes,
        on_command: CommandHandler | None = None,
        on_connected: Callable[[], None] | None = None,
        on_problem: Callable[[str, str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.config = config
        self.station = station
        self.outbox = outbox
        self.prefix = config.prefix_for(station)
        self._on_command = on_command
        self._on_connected = on_connected
        self._on_problem = on_problem or (lambda kind, message, data: None)
        self.v5 = config.protocol == "5"
        client_id = config.client_id or f"lineside-{station}"
        if self.v5:
            self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            self.client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311, clean_session=True
            )
        secure_client(self.client, config, password)
        self.client.will_set(self.topic("status"), offline_payload, qos=1, retain=True)
        self.client.on_connect = self._handle_connect
        self.client.on_connect_fail = self._handle_connect_fail
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_publish = self._handle_publish
        self.client.on_message = self._handle_message
        self.connected = threading.Event()
        self._wake = threading.Event()
        self._acks: collections.deque[tuple[int, bool, str]] = collections.deque()
        self._inflight: dict[int, int] = {}  # paho mid -> outbox seq (pump thread only)
        self._handed = 0  # highest outbox seq handed to paho (pump thread only)
        self._pump_thread: threading.Thread | None = None
        self._pump_stop = threading.Event()
        self._started = False
        self._closed = False
        self._lock = threading.Lock()
        self.counters: dict[str, int] = {"connects": 0, "disconnects": 0, "refused": 0, "published": 0}
        self.last_error: str | None = None
        self._unreachable_logged = False

    def topic(self, name: str) -> str:
        """The full topic of `name` under the prefix."""
        return f"{self.prefix}/{name}"

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start connecting (in the background) and pumping the outbox."""
        self._started = True
        logger.info(
            "mqtt: connecting to %s:%d (MQTT %s%s) as %s, topics under %s",
            self.config.host,
            self.config.port,
            self.config.protocol,
            ", TLS" if self.config.tls is not None else "",
            self.client._client_id.decode(),
            self.prefix,
        )
        self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        self.client.loop_start()
        self._pump_thread = threading.Thread(target=self._pump, name="lineside-mqtt-pump", daemon=True)
        self._pump_thread.start()

    def drain(self, timeout: float) -> bool:
        """Wait (while connected) until the outbox is empty; True when it is."""
        deadline = time.monotonic() + timeout
        while self.outbox.depth() > 0:
            if not self.connected.is_set() or time.monotonic() >= deadline:
                return False
            self._wake.set()
            time.sleep(0.02)
        return True

    def close(self, status_payload: bytes | None) -> None:
        """Publish the final status (when connected), disconnect and stop the threads. Safe to call twice.

        Messages still in the outbox stay there for the next start.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if not self._started:
            return
        self._pump_stop.set()
        self._wake.set()
        if self._pump_thread is not None:
            self._pump_thread.join(5.0)
        if status_payload is not None and self.connected.is_set():
            info = self.client.publish(self.topic("status"), status_payload, qos=1, retain=True)
            deadline = time.monotonic() + 2.0
            while not info.is_published() and self.connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()
        left = self.outbox.depth()
        if left:
            logger.info("mqtt: %d message(s) stay in the outbox for the next start", left)

    # -- publishing outside the outbox (state, not history) --------------------------------------

    def publish_now(
        self, name_or_topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, full_topic: bool = False
    ) -> mqtt.MQTTMessageInfo | None:
        """Publish directly when connected (status, metrics, replies); None when not connected."""
        if not self.connected.is_set():
            return None
        topic = name_or_topic if full_topic else self.topic(name_or_topic)
        return self.client.publish(topic, payload, qos=qos, retain=retain)

    def reply(self, topic: str, payload: bytes, properties: Properties | None = None) -> None:
        """Publish a command reply (QoS 1) when connected."""
        if self.connected.is_set():
            self.client.publish(topic, payload, qos=1, properties=properties)

    def wake(self) -> None:
        """Tell the pump that the outbox has something new."""
        self._wake.set()

    # -- paho callbacks (network thread: queue and wake only) ------------------------------------

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        if reason.is_failure:
            self.counters["refused"] += 1
            self.last_error = f"broker refused the connection: {reason}"
            logger.error(
                "mqtt: %s:%d refused the connection: %s (retrying with backoff; check mqtt.username, the "
                "credential mqtt_password and the broker's ACL)",
                self.config.host,
                self.config.port,
                reason,
            )
            self._on_problem("mqtt_refused", self.last_error, {"reason": str(reason)})
            return
        self.counters["connects"] += 1
        self.last_error = None
        self._unreachable_logged = False
        logger.info("mqtt: connected to %s:%d", self.config.host, self.config.port)
        self.connected.set()
        client.subscribe(self.topic("cmd/+"), qos=1)
        if self._on_connected is not None:
            self._on_connected()  # publishes status online (retained)
        self._wake.set()

    def _handle_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if self.last_error is None or not self.last_error.startswith("TLS"):
            self.last_error = f"cannot reach broker {self.config.host}:{self.config.port}"
        if not self._unreachable_logged:
            self._unreachable_logged = True
            logger.warning("mqtt: %s; results wait in the outbox, retrying with backoff", self.last_error)
            if self.config.tls is not None:
                # paho says only that the connection failed; find out whether TLS is why, off its thread.
                threading.Thread(target=self._diagnose_tls, name="lineside-mqtt-tls-check", daemon=True).start()

    def _diagnose_tls(self) -> None:
        """One TLS handshake with the broker, as paho makes it; a failure is logged and reported as an event."""
        import socket

        tls = self.config.tls
        assert tls is not None
        try:
            context = ssl.create_default_context(cafile=str(tls.ca_file))
            context.check_hostname = tls.check_hostname
            if tls.cert_file is not None and tls.key_file is not None:
                context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
            with (
                socket.create_connection((self.config.host, self.config.port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname=self.config.host),
            ):
                return  # the handshake works: the failure was elsewhere (already logged)
        except ssl.SSLError as err:
            if isinstance(err, ssl.SSLCertVerificationError):
                reason = f"certificate verify failed: {err.verify_message}"  # e.g. signed by another CA
            else:
                reason = str(err.reason or err)
            self.last_error = f"TLS handshake with {self.config.host}:{self.config.port} failed: {reason}"
            logger.error(
                "mqtt: %s (check mqtt.tls.ca_file %s against the broker's certificate); retrying with backoff",
                self.last_error,
                tls.ca_file,
            )
            self._on_problem("mqtt_tls_failed", self.last_error, {"reason": str(reason), "ca_file": str(tls.ca_file)})
        except OSError:
            return  # not reachable at all: already logged as such

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any
    ) -> None:
        was_connected = self.connected.is_set()
        self.connected.clear()
        if was_connected:
            self.counters["disconnects"] += 1
            if not self._closed:
                logger.warning("mqtt: disconnected (%s); results wait in the outbox, reconnecting", reason)

    def _handle_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, properties: Any
    ) -> None:
        self._acks.append((mid, bool(reason.is_failure), str(reason)))
        self._wake.set()

    def _handle_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._on_command is not None:
            self._on_command(message)

    # -- the pump --------------------------------------------------------------------------------

    def _pump(self) -> None:
        window = self.config.outbox.inflight
        while True:
            self._wake.wait(0.2)
            self._wake.clear()
            try:
                self._settle_acks()
                if self._pump_stop.is_set():
                    return
                if self.connected.is_set() and len(self._inflight) < window:
                    self._hand_over(window - len(self._inflight))
            except Exception:
                # The outbox is the record of truth; a failing read is retried, never fatal.
                logger.exception("mqtt: outbox pump failed; retrying")
                self._pump_stop.wait(1.0)

    def _hand_over(self, room: int) -> None:
        for message in self.outbox.after(self._handed, room):
            info = self.client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                # Not queued by paho (e.g. its queue limit): try again later, in order.
                logger.warning("mqtt: could not hand message %d to the client: %s", message.seq, info.rc)
                return
            self._inflight[info.mid] = message.seq
            self._handed = message.seq

    def _settle_acks(self) -> None:
        done: list[int] = []
        rejected: list[tuple[int, str]] = []
        while self._acks:
            mid, failed, reason = self._acks.popleft()
            seq = self._inflight.pop(mid, None)
            if seq is None:
                continue  # status, metrics, replies: not from the outbox
            done.append(seq)
            if failed:
                rejected.append((seq, reason))
        if done:
            self.outbox.delete(done)
            with self._lock:
                self.counters["published"] += len(done) - len(rejected)
        if rejected:
            self.outbox.add_counter("rejected", len(rejected))
            logger.error("mqtt: the broker refused %d message(s): %s", len(rejected), rejected[0][1])
            self._on_problem(
                "outbox_rejected",
                f"the broker refused {len(rejected)} message(s): {rejected[0][1]}",
                {"count": len(rejected), "reason": rejected[0][1]},
            )
        # Reported once connected: a report made during an outage would only wait in the full outbox.
        evicted = self.outbox.take_unreported_evictions() if self.connected.is_set() else 0
        if evicted:
            self._on_problem(
                "outbox_evicted",
                f"outbox full: {evicted} oldest message(s) evicted undelivered",
                {"count": evicted, "total": self.outbox.stats().get("evicted", 0)},
            )


def dumps(payload: Any) -> bytes:
    """Compact JSON bytes of a dict."""
    return json.dumps(payload, separators=(",", ":"), default=str).encode()
