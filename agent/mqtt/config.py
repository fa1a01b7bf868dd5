"""The `mqtt:` section of the agent config: broker, topics, TLS, outbox, commands, metrics.

No section = no MQTT. The password is never in the YAML: it is the credential `mqtt_password`
(`$CREDENTIALS_DIRECTORY/mqtt_password` or `$LINESIDE_MQTT_PASSWORD`), read when the service starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lineside.agent.plugins import StrictConfig, path_problems

PASSWORD_CREDENTIAL = "mqtt_password"
COMMAND_NAMES = ("pause", "resume", "status", "trigger", "set-thresholds", "activate-bundle")
CommandName = Literal["pause", "resume", "status", "trigger", "set-thresholds", "activate-bundle"]


class TlsConfig(StrictConfig):
    """TLS to the broker: the CA that signed its certificate, optionally a client certificate."""

    ca_file: Path = Field(description="PEM file of the CA(s) the broker's certificate must chain to.")
    cert_file: Path | None = Field(default=None, description="PEM client certificate (mutual TLS); needs key_file.")
    key_file: Path | None = Field(default=None, description="PEM private key of the client certificate.")
    check_hostname: bool = Field(
        default=True, description="Check that the broker's certificate names `host`; switch off only for tests."
    )

    def problems(self, key: str) -> list[str]:
        found = path_problems(self.ca_file, f"{key}.ca_file", kind="file")
        found += path_problems(self.cert_file, f"{key}.cert_file", kind="file")
        found += path_problems(self.key_file, f"{key}.key_file", kind="file")
        if (self.cert_file is None) != (self.key_file is None):
            found.append(f"{key}: cert_file and key_file go together (found only one)")
        return found


class OutboxConfig(StrictConfig):
    """The durable SQLite outbox every result and event passes through before it is published."""

    path: Path = Field(
        default=Path("/var/lib/lineside/state/mqtt-outbox.sqlite"),
        description="SQLite file (WAL mode) of messages not yet acknowledged by the broker.",
    )
    max_messages: int = Field(
        default=100_000, ge=10, description="Messages kept at most; beyond it the oldest are evicted (counted)."
    )
    max_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1024, description="Payload bytes kept at most; beyond it the oldest are evicted."
    )
    max_age_s: float = Field(
        default=7 * 24 * 3600.0, ge=0, description="Messages older than this are evicted (counted); 0 = no age limit."
    )
    synchronous: Literal["full", "normal"] = Field(
        default="full",
        description="SQLite synchronous mode: full survives power loss, normal survives a process crash only.",
    )
    inflight: int = Field(
        default=100, ge=1, le=1000, description="Messages handed to the MQTT client and not yet acknowledged, at most."
    )

    def problems(self, key: str) -> list[str]:
        return path_problems(self.path, f"{key}.path", kind="file", write=True, create=True)


class CommandsConfig(StrictConfig):
    """Commands the PLC/SCADA may send on `<topic_prefix>/cmd/<name>`."""

    enabled: list[CommandName] = Field(
        default_factory=lambda: list(COMMAND_NAMES),
        description="Commands accepted; any other gets an error reply and changes nothing. [] = none.",
    )
    max_payload_bytes: int = Field(default=4096, ge=2, le=1_000_000, description="Larger command payloads are refused.")
    trigger_folders: list[Path] = Field(
        default_factory=list,
        max_length=16,
        description="Folders `trigger` may name a file in to inspect now (symbolic links resolved first); "
        "[] = the file form of `trigger` is refused.",
    )

    def problems(self, key: str) -> list[str]:
        found: list[str] = []
        for i, folder in enumerate(self.trigger_folders):
            if not folder.is_absolute():
                found.append(f"{key}.trigger_folders[{i}]: {folder} must be an absolute path")
            else:
                found += path_problems(folder, f"{key}.trigger_folders[{i}]", kind="dir")
        return found


class PartsConfig(StrictConfig):
    """Part-level verdicts on `<prefix>/part`: all views of a part id gathered into one message."""

    views: int = Field(ge=1, le=1000, description="Views per part; a part is complete when all are in.")
    first_view: int = Field(default=1, ge=0, le=1000, description="Number of the first view (views are consecutive).")
    timeout_s: float = Field(
        default=60.0,
        gt=0,
        le=86_400,
        description="A part whose next view has not arrived this long after the last is closed as incomplete, "
        "naming the views it lacks.",
    )
    max_open: int = Field(
        default=1000, ge=1, le=100_000, description="Parts open at once at most; beyond it the oldest is closed."
    )


_SPB_ID = r"^[^#+/\x00]+$"


class SparkplugConfig(StrictConfig):
    """Sparkplug B (spBv1.0) for an Ignition-style SCADA: the agent is an edge node, the station its device."""

    enabled: bool = Field(default=False, description="Publish the station in the Sparkplug B namespace too.")
    group_id: str = Field(default="lineside", min_length=1, max_length=64, pattern=_SPB_ID, description="Group id.")
    edge_node_id: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=_SPB_ID, description="Edge node id. Default: the station."
    )
    device_id: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=_SPB_ID, description="Device id. Default: the station."
    )


class MqttConfig(StrictConfig):
    """MQTT to the line's PLC/SCADA: results, status, events, metrics, commands."""

    host: str = Field(default="127.0.0.1", min_length=1, description="Broker host name or address.")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port (8883 is the usual TLS port).")
    topic_prefix: str | None = Field(
        default=None,
        pattern=r"^[^#+/\x00][^#+\x00]*[^#+/\x00]$|^[^#+/\x00]$",
        description="Prefix of every topic, e.g. lineside/plant-1/line-3/cell-07; no wildcards, no leading or "
        "trailing '/'. Default: lineside/<station>.",
    )
    client_id: str | None = Field(
        default=None, min_length=1, max_length=64, description="MQTT client id. Default: lineside-<station>."
    )
    protocol: Literal["5", "3.1.1"] = Field(default="5", description="MQTT protocol version: 5 or 3.1.1.")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="Keep-alive interval in seconds.")
    qos: Literal[1, 2] = Field(default=1, description="QoS of results and events (0 would give no acknowledgement).")
    reconnect_min_s: int = Field(default=1, ge=1, le=60, description="First delay before reconnecting.")
    reconnect_max_s: int = Field(default=30, ge=1, le=3600, description="Longest delay between reconnect attempts.")
    username: str | None = Field(
        default=None,
        min_length=1,
        description="User name; the password is the credential `mqtt_password`, never in this file.",
    )
    tls: TlsConfig | None = Field(default=None, description="TLS settings; None = plain TCP.")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="The durable outbox.")
    commands: CommandsConfig = Field(default_factory=CommandsConfig, description="Accepted commands.")
    parts: PartsConfig | None = Field(
        default=None, description="Part-level verdicts on the `part` topic; None = no `part` messages."
    )
    sparkplug: SparkplugConfig = Field(
        default_factory=SparkplugConfig, description="Sparkplug B: a second connection whose will is NDEATH."
    )
    state_dir: Path = Field(
        default=Path("/var/lib/lineside/state"),
        description="Folder of state that must survive a restart: thresholds.json (set-thresholds overrides, "
        "written atomically).",
    )
    metrics_interval_s: float = Field(
        default=60.0, ge=0, description="Seconds between two `metrics` messages; 0 turns them off."
    )
    drain_timeout_s: float = Field(
        default=5.0,
        ge=0,
        le=60,
        description="On a clean stop, how long to wait for the outbox to empty before disconnecting (what is "
        "left is sent after the next start).",
    )

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        # YAML reads `protocol: 5` as an int.
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _backoff_in_order(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) is below reconnect_min_s ({self.reconnect_min_s})"
            )
        return self

    def problems(self, key: str) -> list[str]:
        found = self.outbox.problems(f"{key}.outbox")
        found += path_problems(self.state_dir, f"{key}.state_dir", kind="dir", write=True, create=True)
        found += self.commands.problems(f"{key}.commands")
        if self.tls is not None:
            found += self.tls.problems(f"{key}.tls")
        return found

    def prefix_for(self, station: str) -> str:
        """The topic prefix in use."""
        return self.topic_prefix or f"lineside/{station}"
