"""The MQTT service: one connection (`MqttLink`) used both as the service (status, events, metrics,
commands) and by the result sink it brings (`MqttResultSink`, durable: the outbox).

The sink is created from the `mqtt:` section, not listed under `sinks:`: results, events and the
connection share one outbox and one client id, and a second MQTT sink in `sinks:` would fight over
the client id. Shutdown order follows the agent's: `close()` (a service, before the pipeline stops)
refuses further commands and stops metrics; the sink's `close()` (after the pipeline delivered its last
result) drains the outbox for up to `drain_timeout_s`, publishes `status` = stopped and disconnects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from lineside.agent.errors import ConfigError
from lineside.agent.events import Event
from lineside.agent.imaging import DEFAULT_MAX_PIXELS
from lineside.agent.mqtt import thresholds
from lineside.agent.mqtt.config import PASSWORD_CREDENTIAL, MqttConfig
from lineside.agent.mqtt.link import MqttLink
from lineside.agent.mqtt.outbox import Outbox
from lineside.agent.mqtt.parts import PartTracker
from lineside.agent.mqtt.payloads import (
    COMMAND_MODELS,
    ActivateBundleCommand,
    CommandReply,
    EventPayload,
    MetricsPayload,
    OutboxStats,
    PartPayload,
    SetThresholdsCommand,
    StatusPayload,
    TriggerCommand,
)
from lineside.agent.plugins import StrictConfig
from lineside.agent.results import INJECTED_SOURCE, Frame, InspectionResult
from lineside.agent.sinks.base import Sink

if TYPE_CHECKING:
    from lineside.agent.mqtt.sparkplug import SparkplugNode
    from lineside.agent.runtime import Agent

logger = logging.getLogger(__name__)

_COMMAND_QUEUE = 64


def agent_version() -> str | None:
    try:
        return metadata.version("lineside")
    except metadata.PackageNotFoundError:
        return None


class CommandRefused(Exception):
    """A command that is carried out no further; its message is the reply's `error`."""


class MqttService:
    """Status, events, metrics and commands over MQTT, plus the durable result sink; see the module docstring."""

    section: ClassVar[str] = "mqtt"
    config_class: ClassVar[type[StrictConfig]] = MqttConfig
    name = "mqtt"

    def __init__(self, agent: Agent, config: MqttConfig) -> None:
        problems = config.problems("mqtt")
        tls_problems = [p for p in problems if p.startswith("mqtt.tls")]
        if tls_problems:
            raise ConfigError("mqtt: TLS files are missing or unreadable", tls_problems)
        password = None
        if config.username is not None:
            from lineside.agent.config import resolve_secret

            password = resolve_secret(PASSWORD_CREDENTIAL)
            if password is None:
                raise ConfigError(
                    "mqtt: a username is set but its password is not",
                    [
                        f"mqtt.username: the credential {PASSWORD_CREDENTIAL} is missing "
                        "($CREDENTIALS_DIRECTORY/mqtt_password or $LINESIDE_MQTT_PASSWORD)"
                    ],
                )
        self.agent = agent
        self.config = config
        self.station = agent.config.station
        self.outbox = Outbox(
            config.outbox.path,
            max_messages=config.outbox.max_messages,
            max_bytes=config.outbox.max_bytes,
            max_age_s=config.outbox.max_age_s,
            synchronous=config.outbox.synchronous,
        )
        self.link = MqttLink(
            config,
            self.station,
            self.outbox,
            password=password,
            offline_payload=StatusPayload(state="offline", station=self.station).model_dump_json().encode(),
            on_command=self._queue_command,
            on_connected=self._publish_online,
            on_problem=lambda kind, message, data: agent.events.publish(kind, message, **data),
        )
        self.sink = MqttResultSink(self)
        self.parts = None if config.parts is None else PartTracker(config.parts, self.station)
        self._stop = threading.Event()
        self._closing = threading.Event()
        self._commands: queue.Queue[mqtt.MQTTMessage] = queue.Queue(maxsize=_COMMAND_QUEUE)
        self._threads: list[threading.Thread] = []
        self._unsubscribe = agent.events.subscribe(self._on_event)
        self._finished = False
        self.commands_handled: dict[str, int] = {"ok": 0, "refused": 0}
        self._command_lock = threading.Lock()
        self.sparkplug: SparkplugNode | None = None
        if config.sparkplug.enabled:
            from lineside.agent.mqtt.sparkplug import SparkplugNode  # protobuf: only when asked for

            self.sparkplug = SparkplugNode(
                config,
                self.station,
                password=password,
                run_command=self.run_command,
                snapshot=self._spb_snapshot,
            )

    @classmethod
    def from_agent(cls, agent: Agent) -> MqttService | None:
        config: MqttConfig | None = getattr(agent.config, "mqtt", None)
        return None if config is None else cls(agent, config)

    def sinks(self) -> list[Sink]:
        """The sink this service brings: results into the durable outbox."""
        return [self.sink]

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        self._stop = stop
        self._restore_thresholds()
        self.link.start()
        if self.sparkplug is not None:
            self.sparkplug.start()
        for name, target in (
            ("commands", self._command_loop),
            ("metrics", self._metrics_loop),
            ("parts", self._parts_loop),
        ):
            thread = threading.Thread(target=target, name=f"lineside-mqtt-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Refuse further commands, stop metrics; the connection stays up for the last results (see finish)."""
        self._closing.set()
        for thread in self._threads:
            thread.join(2.0)
        self._threads = []

    def finish(self) -> None:
        """Called by the sink's close, after the last result: drain, status stopped, disconnect. Twice is fine."""
        if self._finished:
            return
        self._finished = True
        self._closing.set()
        self._unsubscribe()
        try:
            if self.parts is not None:
                # Open parts live in memory only: report them (incomplete) rather than forget them.
                self._put_parts(self.parts.close_all())
            if self.link.connected.is_set() and self.config.drain_timeout_s > 0:
                self.link.drain(self.config.drain_timeout_s)
            self.link.close(self._status_payload("stopped"))
            if self.sparkplug is not None:
                self.sparkplug.close()
        finally:
            self.outbox.close()

    # -- what goes out ---------------------------------------------------------------------------

    def put_result(self, result: InspectionResult) -> None:
        """Commit a result to the outbox (raises when it cannot: the frame is then not acknowledged)."""
        self.outbox.put(
            self.link.topic("result"),
            result.model_dump_json().encode(),
            qos=self.config.qos,
            key=result.result_id,
        )
        if self.parts is not None:
            try:
                self._put_parts(self.parts.add(result))
            except Exception:
                # The result itself is committed: its frame must not be failed for the part message.
                logger.exception("mqtt: the part message of %s could not be stored", result.part_id)
        self.link.wake()
        if self.sparkplug is not None:
            try:
                self.sparkplug.publish_result(result)
            except Exception:  # live state only: the result is safe in the outbox
                logger.exception("sparkplug: DDATA for %s failed", result.result_id)

    def _spb_snapshot(self) -> dict[str, Any]:
        status = self.agent.status()
        return {"counters": status.counters, "paused": status.paused, "bundle_version": status.bundle_version}

    def _put_parts(self, parts: list[PartPayload]) -> None:
        for part in parts:
            self.outbox.put(self.link.topic("part"), part.model_dump_json().encode(), qos=self.config.qos)
        if parts:
            self.link.wake()

    def _parts_loop(self) -> None:
        if self.parts is None:
            return
        tick = min(1.0, self.parts.config.timeout_s / 4)
        while not self._closing.wait(tick):
            try:
                self._put_parts(self.parts.expire())
            except Exception:
                logger.exception("mqtt: closing timed-out parts failed; retrying")

    def _on_event(self, event: Event) -> None:
        # Synchronous on the publisher's thread: one SQLite commit, no network.
        if event.kind == "bundle_changed":
            self._report_dropped_overrides(event)
        data = json.loads(json.dumps(event.data, default=str))
        payload = EventPayload(kind=event.kind, message=event.message, station=self.station, data=data, at=event.at)
        self.outbox.put(
            self.link.topic("event"),
            payload.model_dump_json().encode(),
            qos=self.config.qos,
            evict=event.kind != "outbox_evicted",  # see Outbox.put
        )
        self.link.wake()

    def _status_payload(self, state: Literal["online", "offline", "stopped"]) -> bytes:
        status = self.agent.status()
        return (
            StatusPayload(
                state=state,
                station=self.station,
                agent_version=agent_version(),
                agent_state=str(status.state),
                bundle_id=status.bundle_id,
                bundle_version=status.bundle_version,
                providers=status.providers,
                paused=status.paused,
            )
            .model_dump_json()
            .encode()
        )

    def _publish_online(self) -> None:
        # On paho's network thread, inside on_connect: publish only (paho allows it there).
        self.link.publish_now("status", self._status_payload("online"), qos=1, retain=True)

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting in the outbox (for /metrics via `Agent.status()`)."""
        return {"mqtt_outbox": self.outbox.depth()}

    def metrics(self) -> MetricsPayload:
        status = self.agent.status()
        outbox = self.outbox.stats()
        return MetricsPayload(
            station=self.station,
            at=_now(),
            state=str(status.state),
            paused=status.paused,
            counters=json.loads(json.dumps(status.counters, default=str)),
            outbox=OutboxStats(
                depth=outbox["depth"],
                bytes=outbox["bytes"],
                evicted=outbox.get("evicted", 0),
                rejected=outbox.get("rejected", 0),
            ),
            mqtt=dict(self.link.counters),
            parts={} if self.parts is None else {**self.parts.counters, "open": self.parts.open_parts()},
        )

    def _metrics_loop(self) -> None:
        interval = self.config.metrics_interval_s
        if interval <= 0:
            return
        while not self._closing.wait(interval) and not self._stop.is_set():
            try:
                self.link.publish_now("metrics", self.metrics().model_dump_json().encode(), qos=0, retain=True)
            except Exception:
                logger.exception("mqtt: publishing metrics failed")

    # -- commands --------------------------------------------------------------------------------

    def _queue_command(self, message: mqtt.MQTTMessage) -> None:
        # paho's network thread: hand over, never work here.
        try:
            self._commands.put_nowait(message)
        except queue.Full:
            self._reply(
                message,
                self._command_name(message),
                CommandReply(
                    command=self._command_name(message), ok=False, error="too many commands waiting; try again"
                ),
            )

    def _command_loop(self) -> None:
        while not self._closing.is_set():
            try:
                message = self._commands.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.handle_command(message)
            except Exception:
                logger.exception("mqtt: command on %s failed", message.topic)
        # Anything left: refuse, never silently.
        while True:
            try:
                message = self._commands.get_nowait()
            except queue.Empty:
                return
            name = self._command_name(message)
            self._reply(message, name, CommandReply(command=name, ok=False, error="the agent is shutting down"))

    def _command_name(self, message: mqtt.MQTTMessage) -> str:
        return message.topic[len(self.link.topic("cmd/")) :]

    def handle_command(self, message: mqtt.MQTTMessage) -> CommandReply:
        """Validate and carry out one command, then reply; an invalid one changes nothing."""
        name = self._command_name(message)
        reply = self.run_command(name, message.payload)
        self._reply(message, name, reply)
        return reply

    def run_command(self, name: str, payload: bytes) -> CommandReply:
        """Validate and carry out one command (from `cmd/<name>` or a Sparkplug DCMD); never raises."""
        request_id: str | None = None
        # One command at a time, whichever connection it came on (set-thresholds reads, then writes).
        with self._command_lock:
            try:
                _model, data = self._validate(name, payload)
                request_id = data.request_id
                result = self._execute(name, data)
                reply = CommandReply(command=name, ok=True, request_id=request_id, result=result)
                self.commands_handled["ok"] += 1
            except CommandRefused as err:
                reply = CommandReply(command=name, ok=False, request_id=request_id, error=str(err))
                self.commands_handled["refused"] += 1
                logger.warning("mqtt: command %r refused: %s", name[:64], err)
        return reply

    def _validate(self, name: str, payload: bytes) -> tuple[type, Any]:
        if self._closing.is_set():
            raise CommandRefused("the agent is shutting down")
        model = COMMAND_MODELS.get(name)
        if model is None:
            raise CommandRefused(f"unknown command {name[:64]!r}; expected one of {sorted(COMMAND_MODELS)}")
        if name not in self.config.commands.enabled:
            raise CommandRefused(f"command {name!r} is switched off (mqtt.commands.enabled)")
        limit = self.config.commands.max_payload_bytes
        if len(payload) > limit:
            raise CommandRefused(f"payload of {len(payload)} bytes is over the limit of {limit} bytes")
        if payload.strip() == b"":
            data: Any = {}
        else:
            try:
                data = json.loads(payload.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as err:
                raise CommandRefused(f"payload is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise CommandRefused(f"payload must be a JSON object, found {type(data).__name__}")
        try:
            return model, model.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '<payload>'}: {e['msg']}" for e in err.errors(include_url=False)
            )
            raise CommandRefused(f"invalid payload: {problems}") from err

    def _execute(self, name: str, data: Any) -> dict[str, Any]:
        agent = self.agent
        if name == "status":
            return json.loads(self._status_payload("online"))
        if agent.pipeline is None:
            raise CommandRefused("the pipeline is not running")
        if name == "pause":
            return {"changed": agent.pause(), "paused": True}
        if name == "resume":
            return {"changed": agent.resume(), "paused": False}
        if name == "trigger":
            trigger: TriggerCommand = data
            if trigger.file is not None:
                return self._inspect_file(trigger)
            assert trigger.part_id is not None  # the model requires part_id or file
            agent.tag_next(trigger.part_id, trigger.view)
            return {"part_id": trigger.part_id, "view": trigger.view}
        if name == "set-thresholds":
            return self._set_thresholds(data)
        if name == "activate-bundle":
            command: ActivateBundleCommand = data
            try:
                return agent.activate_bundle(bundle_id=command.bundle_id, version=command.version)
            except (RuntimeError, ValueError) as err:
                raise CommandRefused(str(err)) from err
        raise CommandRefused(f"command {name!r} has no handler")  # a model without a handler: a bug

    # -- trigger with a file -----------------------------------------------------------------------

    def _allowed_file(self, name: str) -> Path:
        """The real path of `name` when it is a regular file inside an allowed folder; CommandRefused otherwise."""
        folders = self.config.commands.trigger_folders
        if not folders:
            raise CommandRefused("trigger with a file is switched off (mqtt.commands.trigger_folders is empty)")
        raw = Path(name)
        if not raw.is_absolute():
            raise CommandRefused(f"file {name[:256]!r} must be an absolute path")
        try:
            # Resolve first: '..' and symbolic links must not lead out of an allowed folder.
            real = raw.resolve(strict=True)
        except (OSError, RuntimeError):
            raise CommandRefused(f"file {name[:256]!r} does not exist") from None
        allowed = [Path(f).resolve() for f in folders]
        if not any(real.is_relative_to(folder) for folder in allowed):
            raise CommandRefused(f"file {name[:256]!r} is outside the allowed folders {[str(f) for f in allowed]}")
        if not real.is_file():
            raise CommandRefused(f"file {name[:256]!r} is not a regular file")
        return real

    def _inspect_file(self, trigger: TriggerCommand) -> dict[str, Any]:
        assert trigger.file is not None
        path = self._allowed_file(trigger.file)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CommandRefused(f"file {str(path)[:256]!r} cannot be read: {err.strerror or err}") from err
        from lineside.agent.sources.base import frame_from_bytes  # here: sources import the agent config

        digest = hashlib.sha256(data).hexdigest()
        frame = frame_from_bytes(
            data,
            name=path.name,
            source=INJECTED_SOURCE,
            # Same file, content and tag: same result id (a repeated request is de-duplicated downstream);
            # the same file named for another part or view is another inspection.
            key=f"{path}:{digest}:{trigger.part_id}:{trigger.view}",
            max_pixels=DEFAULT_MAX_PIXELS,
            part_id=trigger.part_id,
            view=trigger.view,
            meta={"file": str(path), "tagged_by": "trigger-file"},
            station=self.station,
        )
        try:
            self.agent.inspect_now(frame)
        except RuntimeError as err:
            raise CommandRefused(str(err)) from err
        return {
            "file": str(path),
            "result_id": frame.result_id,
            "part_id": trigger.part_id,
            "view": trigger.view,
            "decode_error": None if frame.error is None else frame.error.code,
        }

    # -- thresholds ------------------------------------------------------------------------------

    def _restore_thresholds(self) -> None:
        """Apply the overrides saved for this bundle version (a restart keeps them); report either way."""
        engine = self.agent.engine
        state = self.config.state_dir
        if engine is None or not thresholds.supports_overrides(engine) or not (state / thresholds.STATE_FILE).exists():
            return
        manifest = engine.manifest
        try:
            overrides = thresholds.load(state, engine, manifest.bundle_id, manifest.version)  # type: ignore[arg-type]
            engine.set_threshold_overrides(overrides)  # type: ignore[attr-defined]
        except ValueError as err:  # ThresholdError included: the bundle's thresholds stay
            logger.warning("mqtt: saved thresholds not applied: %s", err)
            self.agent.events.publish(
                "thresholds_not_restored", str(err), state_file=str(state / thresholds.STATE_FILE)
            )
            return
        if overrides:
            logger.info(
                "mqtt: thresholds restored from %s: %s", state / thresholds.STATE_FILE, thresholds.dump(overrides)
            )
            self.agent.events.publish(
                "thresholds_restored",
                f"threshold overrides restored for bundle {manifest.version}",
                overrides=thresholds.dump(overrides),
            )

    def _report_dropped_overrides(self, event: Event) -> None:
        """A swapped-in bundle starts from its own calibrated thresholds: say so when the operator had
        overridden the old bundle's, so nobody believes a line-side setting still holds."""
        path = self.config.state_dir / thresholds.STATE_FILE
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # no overrides saved (or an unreadable file, reported at the next start)
        old, new = event.data.get("old_version"), event.data.get("version")
        if not isinstance(body, dict) or not body.get("overrides") or body.get("bundle_version") != old or old == new:
            return
        self.agent.events.publish(
            "thresholds_dropped",
            f"threshold overrides set for bundle {old} do not apply to bundle {new}: its calibrated thresholds "
            "are in force; send set-thresholds again if they are still wanted",
            old_version=old,
            version=new,
            overrides=body["overrides"],
        )

    def _set_thresholds(self, command: SetThresholdsCommand) -> dict[str, Any]:
        engine: Any = self.agent.engine
        if engine is None or not thresholds.supports_overrides(engine):
            raise CommandRefused("this engine has no adjustable thresholds")
        before = engine.effective_thresholds() if hasattr(engine, "effective_thresholds") else engine.thresholds()
        previous = engine.threshold_overrides()
        try:
            overrides = thresholds.merged_overrides(engine, command.thresholds, reset=command.reset)
        except thresholds.ThresholdError as err:
            raise CommandRefused(str(err)) from err
        manifest = engine.manifest
        # Persist first: a change the next start would forget is refused rather than half made.
        try:
            path = thresholds.save(self.config.state_dir, manifest.bundle_id, manifest.version, overrides)
        except OSError as err:
            raise CommandRefused(f"cannot save the thresholds in {self.config.state_dir}: {err}") from err
        try:
            engine.set_threshold_overrides(overrides)
        except ValueError as err:  # refused by the engine: put the file back as it was
            thresholds.save(self.config.state_dir, manifest.bundle_id, manifest.version, previous)
            raise CommandRefused(str(err)) from err
        after = {**engine.thresholds(), **overrides}
        changed = {
            kind: {"from": before[kind].model_dump(mode="json"), "to": value.model_dump(mode="json")}
            for kind, value in after.items()
            if before.get(kind) != value
        }
        self.agent.events.publish(
            "thresholds_changed",
            f"thresholds changed for {sorted(changed) or 'no model'} (bundle {manifest.version})",
            changed=changed,
            reset=command.reset,
            request_id=command.request_id,
            bundle_version=manifest.version,
        )
        logger.info("mqtt: thresholds changed: %s (saved in %s)", changed, path)
        return {
            "thresholds": thresholds.dump(after),
            "overrides": thresholds.dump(overrides),
            "changed": sorted(changed),
        }

    def _reply(self, message: mqtt.MQTTMessage, name: str, reply: CommandReply) -> None:
        payload = reply.model_dump_json().encode()
        self.link.reply(self.link.topic(f"cmd/{name}/reply"), payload)
        props = getattr(message, "properties", None)
        response_topic = getattr(props, "ResponseTopic", None) if props is not None else None
        if self.link.v5 and response_topic:
            out = Properties(PacketTypes.PUBLISH)
            correlation = getattr(props, "CorrelationData", None)
            if correlation is not None:
                out.CorrelationData = correlation
            try:
                self.link.reply(response_topic, payload, out)
            except ValueError as err:  # a response topic with wildcards: nowhere to send it
                logger.warning("mqtt: cannot reply on response topic %r: %s", response_topic[:128], err)


def _now() -> Any:
    from datetime import UTC, datetime

    return datetime.now(UTC)


class MqttResultSink(Sink):
    """Results into the MQTT outbox (durable: committed to SQLite before the frame is acknowledged)."""

    config_class = MqttConfig
    durable = True

    def __init__(self, service: MqttService) -> None:
        self.service = service
        self.name = "mqtt"

    def publish(self, result: InspectionResult, frame: Frame) -> None:
        self.service.put_result(result)

    def close(self) -> None:
        self.service.finish()
