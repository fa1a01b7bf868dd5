"""Every MQTT payload as a pydantic model: what the agent publishes and the commands it accepts.

`docs/mqtt.md` carries the JSON Schema of each (`schemas()`); a test checks the document is current.
The `result` topic carries `InspectionResult` exactly as the JSON-lines sink writes it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lineside.agent.results import InspectionResult


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StatusPayload(_Payload):
    """`<prefix>/status`, retained: online on every (re)connect, offline as the last will, stopped on a clean stop."""

    state: Literal["online", "offline", "stopped"] = Field(description="Connection state of the agent.")
    station: str = Field(description="Station name from the agent config.")
    agent_version: str | None = Field(default=None, description="Version of the lineside package.")
    agent_state: str | None = Field(default=None, description="The agent's own state (running, stopping...).")
    bundle_id: str | None = Field(default=None, description="Id of the model bundle served.")
    bundle_version: str | None = Field(default=None, description="Version of the model bundle served.")
    providers: list[str] = Field(default_factory=list, description="ONNX Runtime providers in use.")
    paused: bool | None = Field(default=None, description="True while inspection is paused by a command.")
    at: datetime = Field(default_factory=lambda: datetime.now(UTC), description="When this status was made (UTC).")


class EventPayload(_Payload):
    """`<prefix>/event`: errors, drops, bundle changes, pause/resume, outbox evictions (kind + fields)."""

    kind: str = Field(description="Event kind, e.g. frame_error, frame_dropped, bundle_changed, outbox_evicted.")
    message: str = Field(description="Human-readable sentence.")
    station: str = Field(description="Station name.")
    data: dict[str, Any] = Field(default_factory=dict, description="Structured fields of the event.")
    at: datetime = Field(description="When the event happened (UTC).")


class PartView(_Payload):
    """One view of a part, as its result said."""

    view: int = Field(description="View number.")
    result_id: str = Field(description="The view's result id (on the `result` topic).")
    is_defective: bool | None = Field(description="The view's verdict; None when it could not be inspected.")
    score: float | None = Field(default=None, description="The view's score in [0, 1].")
    error: str | None = Field(default=None, description="Error code when the view could not be inspected.")


class PartPayload(_Payload):
    """`<prefix>/part`: the part-level verdict once all views of a part id are in (or it timed out)."""

    part_id: str = Field(description="Part serial.")
    station: str = Field(description="Station name.")
    verdict: Literal["good", "defective", "unknown"] = Field(
        description="defective: at least one view is (complete or not); good: every expected view is in and "
        "good; unknown: a view is missing or could not be inspected, and none is defective."
    )
    complete: bool = Field(description="True when every expected view is in.")
    closed_by: Literal["all_views", "timeout", "overflow", "shutdown"] = Field(
        description="Why the part was closed: all views in, views stopped arriving (timeout_s), too many open "
        "parts (max_open), or the agent stopped."
    )
    score: float | None = Field(default=None, description="Highest view score.")
    views_expected: list[int] = Field(description="The configured view numbers.")
    views_seen: list[int] = Field(description="View numbers that arrived.")
    views_missing: list[int] = Field(description="Expected views that did not arrive.")
    views: list[PartView] = Field(description="Each view that arrived, by view number.")
    opened_at: datetime = Field(description="When the first view arrived (UTC).")
    closed_at: datetime = Field(description="When the part was closed (UTC).")


class OutboxStats(_Payload):
    """The outbox as seen in `metrics`."""

    depth: int = Field(description="Messages waiting for a broker acknowledgement.")
    bytes: int = Field(description="Payload bytes waiting.")
    evicted: int = Field(default=0, description="Messages evicted because the outbox was full or too old (ever).")
    rejected: int = Field(default=0, description="Messages the broker refused in its acknowledgement (ever).")


class MetricsPayload(_Payload):
    """`<prefix>/metrics`, retained, every `metrics_interval_s`: the pipeline's counters and latencies."""

    station: str = Field(description="Station name.")
    at: datetime = Field(description="When the snapshot was taken (UTC).")
    state: str = Field(description="The agent's state.")
    paused: bool = Field(description="True while inspection is paused.")
    counters: dict[str, Any] = Field(
        description="Pipeline counters: frames_in, results_out, errors, drops_by_reason, queue_depth, latency_ms "
        "(per stage: count, mean, p50, p95, max in ms), source counters."
    )
    outbox: OutboxStats = Field(description="The durable outbox.")
    mqtt: dict[str, int] = Field(description="Connection counters: connects, disconnects, refused, published.")
    parts: dict[str, int] = Field(
        default_factory=dict,
        description="With `parts` configured: parts closed by reason (all_views, timeout, overflow, shutdown), "
        "results whose view is not a configured one (ignored), and parts open now (open).",
    )


# -- commands ---------------------------------------------------------------------------------------


class _Command(_Payload):
    request_id: str | None = Field(
        default=None, max_length=128, description="Echoed in the reply, to match replies to requests."
    )


class EmptyCommand(_Command):
    """`cmd/pause`, `cmd/resume`, `cmd/status`: no arguments (an empty payload or `{}`)."""


class TriggerCommand(_Command):
    """`cmd/trigger`: the part serial and view of the next frame (the PLC trigger input), or a file to
    inspect now (`file`, inside one of `mqtt.commands.trigger_folders`; tagged with part_id/view when given)."""

    part_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Part serial of the next frame (or of `file`).",
    )
    view: int | None = Field(default=None, ge=0, le=1000, description="View number of the next frame (or of `file`).")
    file: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="Absolute path of an image to inspect now, inside an allowed folder; the reply carries its "
        "result_id.",
    )

    @model_validator(mode="after")
    def _something_to_do(self) -> TriggerCommand:
        if self.part_id is None and self.file is None:
            raise ValueError("give part_id (tag the next frame) or file (inspect it now)")
        if self.file is not None and "\x00" in self.file:
            raise ValueError("file: contains a NUL character")
        return self


_Name = Annotated[str, Field(min_length=1, max_length=64)]
_Value = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class SetThresholdsCommand(_Command):
    """`cmd/set-thresholds`: change thresholds within the bounds the bundle allows, or go back to the bundle's.

    `{"thresholds": {"classifier": {"image": 0.6}}}` changes the named fields (the others keep their value);
    `{"reset": true}` drops every override. Persisted across restarts (for this bundle version), reported as
    the event `thresholds_changed`.
    """

    thresholds: dict[_Name, dict[_Name, _Value]] = Field(
        default_factory=dict,
        max_length=16,
        description="Model kind -> threshold field -> new value; the bounds of each field come from the bundle "
        "(see docs/mqtt.md).",
    )
    reset: bool = Field(
        default=False, strict=True, description="True: forget every override, use the bundle's thresholds."
    )

    @model_validator(mode="after")
    def _one_of(self) -> SetThresholdsCommand:
        if self.reset == bool(self.thresholds):
            raise ValueError("give either thresholds (a non-empty object) or reset: true")
        if any(not fields for fields in self.thresholds.values()):
            raise ValueError("thresholds: every kind needs at least one field")
        return self


class ActivateBundleCommand(_Command):
    """`cmd/activate-bundle`: serve a bundle the updates service keeps (roll back or forward), by id or version.

    The bundle is verified and its golden images replayed before it takes over between two frames; the reply's
    `result` names the bundle now served and the previous one. Needs an enabled `updates:` section.
    """

    bundle_id: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$", description="Id of a kept bundle."
    )
    version: str | None = Field(default=None, min_length=1, max_length=128, description="Version of a kept bundle.")

    @model_validator(mode="after")
    def _exactly_one(self) -> ActivateBundleCommand:
        if (self.bundle_id is None) == (self.version is None):
            raise ValueError("give exactly one of bundle_id or version")
        return self


class CommandReply(_Payload):
    """`<prefix>/cmd/<name>/reply` (and the MQTT 5 response topic, with the correlation data, when given)."""

    command: str = Field(description="The command name from the topic.")
    ok: bool = Field(description="True when the command was carried out.")
    request_id: str | None = Field(default=None, description="The request's request_id, when it had a valid one.")
    error: str | None = Field(default=None, description="Why the command was refused (validation error...).")
    result: dict[str, Any] = Field(default_factory=dict, description="What the command returns (e.g. the status).")


COMMAND_MODELS: dict[str, type[_Command]] = {
    "pause": EmptyCommand,
    "resume": EmptyCommand,
    "status": EmptyCommand,
    "trigger": TriggerCommand,
    "set-thresholds": SetThresholdsCommand,
    "activate-bundle": ActivateBundleCommand,
}


def schemas() -> dict[str, dict[str, Any]]:
    """Topic (under the prefix) -> JSON Schema of its payload."""
    return {
        "status": StatusPayload.model_json_schema(),
        "result": InspectionResult.model_json_schema(),
        "part": PartPayload.model_json_schema(),
        "event": EventPayload.model_json_schema(),
        "metrics": MetricsPayload.model_json_schema(),
        "cmd/pause, cmd/resume, cmd/status": EmptyCommand.model_json_schema(),
        "cmd/trigger": TriggerCommand.model_json_schema(),
        "cmd/set-thresholds": SetThresholdsCommand.model_json_schema(),
        "cmd/activate-bundle": ActivateBundleCommand.model_json_schema(),
        "cmd/<name>/reply": CommandReply.model_json_schema(),
    }


def render_schemas() -> str:
    """The JSON Schema section of docs/mqtt.md (between its schema markers); a test keeps the two equal."""
    import json

    parts = []
    for topic, schema in schemas().items():
        parts.append(f"### `{topic}`\n\n```json\n{json.dumps(schema, indent=2, sort_keys=True)}\n```\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(render_schemas(), end="")
