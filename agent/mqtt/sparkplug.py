"""Sparkplug B (spBv1.0): the agent as an edge node, the station as its device, for an Ignition-style SCADA.

A second MQTT connection (client id `<client_id>-spb`), because Sparkplug needs the connection's last
will to be NDEATH and the first connection's will is `status` = offline. Payloads: `spb_proto.py` (the
Sparkplug B protobuf; pysparkplug needs paho-mqtt < 2).

- bdSeq: kept in `<state_dir>/sparkplug-bdseq` and advanced for every connection: the will (NDEATH) set
  before a connect and the NBIRTH after it carry the same bdSeq, so a host matches a death to its birth.
- On connect: NBIRTH (bdSeq, `Node Control/Rebirth`), DBIRTH (every device metric with its type), then
  the NCMD/DCMD subscriptions. `seq` runs 0..255 over NBIRTH, DBIRTH and every DDATA.
- DDATA per result: verdict, score, box count, part id, and the counters.
- NCMD `Node Control/Rebirth` = true: NBIRTH + DBIRTH again. DCMD `Command/<name>` (String, the JSON
  payload of the MQTT command; Boolean true = `{}`) runs the same command as `<prefix>/cmd/<name>`, with
  the same validation; the reply goes out as the DDATA metric `Command/Last Reply` (JSON).
- Live state, not history: DDATA is QoS 0 and not in the outbox (the `result` topic is the record).
- A clean stop publishes NDEATH itself, then disconnects.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from lineside.agent.mqtt import spb_proto
from lineside.agent.mqtt.config import MqttConfig
from lineside.agent.mqtt.link import secure_client
from lineside.agent.mqtt.spb_proto import DataType, Metric, Payload
from lineside.agent.results import InspectionResult

logger = logging.getLogger(__name__)

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
LAST_REPLY = "Command/Last Reply"
BDSEQ_FILE = "sparkplug-bdseq"

# Device metrics: name -> Sparkplug type. Counters come from the pipeline's status snapshot.
DEVICE_METRICS: dict[str, DataType] = {
    "Inspection/Verdict": DataType.STRING,  # good | defective | error
    "Inspection/Defective": DataType.BOOLEAN,
    "Inspection/Score": DataType.DOUBLE,
    "Inspection/Box Count": DataType.INT32,
    "Inspection/Part ID": DataType.STRING,
    "Inspection/View": DataType.INT32,
    "Inspection/Result ID": DataType.STRING,
    "Counters/Frames In": DataType.INT64,
    "Counters/Results Out": DataType.INT64,
    "Counters/Defects": DataType.INT64,
    "Counters/Errors": DataType.INT64,
    "State/Paused": DataType.BOOLEAN,
    "Bundle/Version": DataType.STRING,
    LAST_REPLY: DataType.STRING,
}

CommandRunner = Callable[[str, bytes], Any]  # (command name, JSON payload) -> CommandReply


def _now_ms() -> int:
    return int(time.time() * 1000)


class SparkplugNode:
    """The Sparkplug B edge node; see the module docstring."""

    def __init__(
        self,
        config: MqttConfig,
        station: str,
        *,
        password: str | None,
        run_command: CommandRunner,
        snapshot: Callable[[], dict[str, Any]],
    ) -> None:
        spb = config.sparkplug
        self.config = config
        self.group_id = spb.group_id
        self.edge_node_id = spb.edge_node_id or station
        self.device_id = spb.device_id or station
        self._run_command = run_command
        self._snapshot = snapshot
        self._state_file = config.state_dir / BDSEQ_FILE
        self._lock = threading.Lock()
        # Held while a seq is taken and its message handed to paho: DDATA never slips in between the
        # births, and seq order is publish order. (With paho's loop thread running, publish only queues.)
        self._send_lock = threading.RLock()
        self._seq = 0
        self._defects = 0
        self._last: dict[str, Any] = {}  # last value of each device metric (for DBIRTH)
        self.bd_seq = self._read_bdseq()
        self._commands: queue.Queue[tuple[str, bytes]] = queue.Queue(maxsize=64)
        self._closing = threading.Event()
        self._worker: threading.Thread | None = None
        self.connected = threading.Event()
        client_id = f"{config.client_id or f'lineside-{station}'}-spb"[:64]
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        secure_client(self.client, config, password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self._set_will()

    # -- topics and bdSeq ------------------------------------------------------------------------

    def topic(self, kind: str, device: bool = False) -> str:
        base = f"{NAMESPACE}/{self.group_id}/{kind}/{self.edge_node_id}"
        return f"{base}/{self.device_id}" if device else base

    def _read_bdseq(self) -> int:
        try:
            return (int(self._state_file.read_text().strip()) + 1) % 256
        except (OSError, ValueError):
            return 0

    def _set_will(self) -> None:
        # The will of the next connection: NDEATH with this bdSeq (NBIRTH repeats it after the connect).
        try:
            self._state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._state_file.with_suffix(".tmp")
            tmp.write_text(f"{self.bd_seq}\n")
            os.replace(tmp, self._state_file)
        except OSError as err:
            logger.warning("sparkplug: cannot keep bdSeq in %s: %s", self._state_file, err)
        self.client.will_set(self.topic("NDEATH"), self._ndeath(), qos=1, retain=False)

    def _ndeath(self) -> bytes:
        metric = Metric(timestamp=_now_ms(), name="bdSeq", datatype=DataType.INT64, value=self.bd_seq)
        return spb_proto.encode(Payload(timestamp=_now_ms(), metrics=(metric,)))  # NDEATH has no seq

    def _next_seq(self) -> int:
        with self._lock:
            seq, self._seq = self._seq, (self._seq + 1) % 256
            return seq

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._worker = threading.Thread(target=self._command_loop, name="lineside-sparkplug-cmd", daemon=True)
        self._worker.start()
        self.client.connect_async(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        self.client.loop_start()

    def close(self) -> None:
        """NDEATH ourselves (a clean stop sends no will), then disconnect."""
        self._closing.set()
        if self.connected.is_set():
            info = self.client.publish(self.topic("NDEATH"), self._ndeath(), qos=1)
            deadline = time.monotonic() + 2.0
            while not info.is_published() and self.connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        self.client.disconnect()
        self.client.loop_stop()
        if self._worker is not None:
            self._worker.join(2.0)

    # -- births and data -------------------------------------------------------------------------

    def _births(self) -> None:
        with self._send_lock:
            self._publish_births()

    def _publish_births(self) -> None:
        with self._lock:
            self._seq = 0
        node = Payload(
            timestamp=_now_ms(),
            seq=self._next_seq(),
            metrics=(
                Metric(timestamp=_now_ms(), name="bdSeq", datatype=DataType.INT64, value=self.bd_seq),
                Metric(timestamp=_now_ms(), name=REBIRTH, datatype=DataType.BOOLEAN, value=False),
            ),
        )
        self.client.publish(self.topic("NBIRTH"), spb_proto.encode(node), qos=0)
        values = {**self._defaults(), **self._counter_values(), **self._last}
        device = Payload(
            timestamp=_now_ms(),
            seq=self._next_seq(),
            metrics=tuple(
                Metric(
                    timestamp=_now_ms(),
                    name=name,
                    datatype=dtype,
                    value=values.get(name),
                )
                for name, dtype in DEVICE_METRICS.items()
            ),
        )
        self.client.publish(self.topic("DBIRTH", device=True), spb_proto.encode(device), qos=0)

    def _defaults(self) -> dict[str, Any]:
        return {LAST_REPLY: ""}

    def _counter_values(self) -> dict[str, Any]:
        snap = self._snapshot()
        counters = snap.get("counters", {})
        return {
            "Counters/Frames In": int(counters.get("frames_in", 0)),
            "Counters/Results Out": int(counters.get("results_out", 0)),
            "Counters/Errors": int(counters.get("errors", 0)),
            "Counters/Defects": self._defects,
            "State/Paused": bool(snap.get("paused", False)),
            "Bundle/Version": str(snap.get("bundle_version") or ""),
        }

    def _ddata(self, values: dict[str, Any]) -> None:
        with self._lock:
            self._last.update(values)
        if not self.connected.is_set():
            return
        metrics = tuple(
            Metric(timestamp=_now_ms(), name=name, datatype=DEVICE_METRICS[name], value=value)
            for name, value in values.items()
        )
        with self._send_lock:
            if not self.connected.is_set():
                return  # births not made yet (or lost the connection): DBIRTH carries the last values
            payload = Payload(timestamp=_now_ms(), seq=self._next_seq(), metrics=metrics)
            self.client.publish(self.topic("DDATA", device=True), spb_proto.encode(payload), qos=0)

    def publish_result(self, result: InspectionResult) -> None:
        """DDATA for one result (dispatch thread; QoS 0, nothing waits on it)."""
        if result.is_defective:
            self._defects += 1
        verdict = "error" if result.is_defective is None else ("defective" if result.is_defective else "good")
        self._ddata(
            {
                "Inspection/Verdict": verdict,
                "Inspection/Defective": result.is_defective,
                "Inspection/Score": result.score,
                "Inspection/Box Count": len(result.boxes),
                "Inspection/Part ID": result.part_id or "",
                "Inspection/View": result.view,
                "Inspection/Result ID": result.result_id,
                **self._counter_values(),
            }
        )

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            logger.error("sparkplug: the broker refused the connection: %s", reason)
            return
        with self._send_lock:
            self._publish_births()
            self.connected.set()  # DDATA only after DBIRTH
        client.subscribe([(self.topic("NCMD"), 1), (self.topic("DCMD", device=True), 1)])
        logger.info("sparkplug: online as %s (bdSeq %d)", self.topic("NBIRTH"), self.bd_seq)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self.connected.clear()
        if not self._closing.is_set():
            # The next connection is a new session: a new bdSeq, in its will and its NBIRTH.
            self.bd_seq = (self.bd_seq + 1) % 256
            self._set_will()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            if message.topic == self.topic("NCMD"):
                for metric in spb_proto.decode(message.payload).metrics:
                    if metric.name == REBIRTH and metric.value is True:
                        self._births()
                return
            for metric in spb_proto.decode(message.payload).metrics:
                name = metric.name or ""
                if not name.startswith("Command/") or name == LAST_REPLY:
                    continue
                command = name[len("Command/") :]
                if isinstance(metric.value, str):
                    self._commands.put_nowait((command, metric.value.encode("utf-8")))
                elif metric.value is True:
                    self._commands.put_nowait((command, b"{}"))
                else:
                    # Refused here, as the MQTT form would refuse a payload of the wrong type; nothing runs.
                    reply = {
                        "command": command[:64],
                        "ok": False,
                        "error": f"{name[:80]}: expected a String (the JSON payload) or Boolean true, "
                        f"got {metric.datatype.name} {metric.value!r}"[:300],
                    }
                    self._ddata({LAST_REPLY: json.dumps(reply)})
        except queue.Full:
            logger.warning("sparkplug: too many commands waiting; one dropped")
        except Exception as err:  # a payload that is not Sparkplug: logged, never fatal
            logger.warning("sparkplug: undecodable command on %s: %s", message.topic[:128], err)
            self._ddata(
                {LAST_REPLY: f'{{"ok": false, "error": "undecodable Sparkplug payload: {type(err).__name__}"}}'}
            )

    def _command_loop(self) -> None:
        while not self._closing.is_set():
            try:
                name, payload = self._commands.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                reply = self._run_command(name, payload)
                self._ddata({LAST_REPLY: reply.model_dump_json(), **self._counter_values()})
            except Exception:
                logger.exception("sparkplug: command %r failed", name[:64])
