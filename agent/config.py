"""The agent's configuration: one YAML file validated by pydantic, plus secrets from systemd credentials.

Every model forbids unknown keys and documents every field, so `lineside-agent check-config` can name
each problem by its key path. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from lineside.agent.errors import EXIT_CONFIG, ConfigError
from lineside.agent.inference.settings import GraphOptimization, SessionSettings
from lineside.agent.mqtt.config import MqttConfig
from lineside.agent.plugins import QueuePolicy, StrictConfig, path_problems
from lineside.agent.s3.config import S3Config
from lineside.agent.s3.updates import UpdatesConfig
from lineside.agent.s3.uploads import UploadsConfig
from lineside.agent.services.health import HealthConfig
from lineside.agent.services.notify import NotifyConfig
from lineside.agent.services.status_log import StatusLogConfig
from lineside.agent.sinks import SinkConfig
from lineside.agent.sinks.jsonl import JsonlSinkConfig
from lineside.agent.sources import SourceConfig

__all__ = ["EXIT_CONFIG", "AgentConfig", "ConfigError", "load_config", "parse_config", "resolve_secret"]

ProviderName = Literal["tensorrt", "cuda", "cpu"]
_SECRET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class BundleConfig(StrictConfig):
    """Where the model bundle lives."""

    path: Path = Field(description="Folder holding the model bundle (manifest.json + ONNX files), or its .tar.gz.")

    def problems(self, key: str) -> list[str]:
        if self.path.is_file():
            return path_problems(self.path, f"{key}.path", kind="file")
        found = path_problems(self.path, f"{key}.path")
        return found or path_problems(self.path / "manifest.json", f"{key}.path", kind="file")


class InferenceConfig(StrictConfig):
    """How ONNX Runtime runs the bundle."""

    providers: list[ProviderName] = Field(
        default_factory=lambda: ["tensorrt", "cuda", "cpu"],
        min_length=1,
        description="Execution providers in order of preference; unavailable ones are skipped.",
    )
    device_id: int = Field(default=0, ge=0, description="GPU index used by the CUDA and TensorRT providers.")
    require_gpu: bool = Field(
        default=False,
        description="Refuse to start when no GPU provider could be set up (no silent CPU fallback).",
    )
    trt_fp16: bool = Field(default=True, description="Let TensorRT build FP16 engines.")
    trt_cache_dir: Path | None = Field(
        default=None, description="Where TensorRT engines are cached between starts; None disables the cache."
    )
    verify_golden: bool = Field(
        default=True, description="Run the bundle's golden images at load and refuse a bundle that disagrees."
    )
    intra_op_threads: int = Field(
        default=0,
        ge=0,
        le=256,
        description="ONNX Runtime threads per model run; 0 = the usable cores, at most 8 (docs/benchmarks.md; "
        "`lineside-agent bench --threads 1,2,4` measures a box).",
    )
    allow_spinning: bool = Field(
        default=False,
        description="Let idle ONNX Runtime threads busy-wait for work: lower latency on an otherwise idle box, "
        "but it steals CPU from the pipeline and other processes (measured slower on a shared 2-core box).",
    )
    graph_optimization: GraphOptimization = Field(
        default="all",
        description="ONNX Runtime graph optimisation level (disable, basic, extended, all); 'all' measured fastest.",
    )
    skip_unneeded_models: bool = Field(
        default=True,
        description="Run a model only when the bundle's decision rule needs it for this frame: localisers that "
        "only report boxes (not in decision.defective_if_any) run on frames judged defective. Verdict, score "
        "and boxes are unchanged; results then list model_scores only for the models that ran.",
    )

    def session_settings(self) -> SessionSettings:
        """The ONNX Runtime session settings these fields describe."""
        return SessionSettings(
            intra_op_threads=self.intra_op_threads,
            allow_spinning=self.allow_spinning,
            graph_optimization=self.graph_optimization,
        )

    def problems(self, key: str) -> list[str]:
        return path_problems(self.trt_cache_dir, f"{key}.trt_cache_dir", write=True, create=True)


class QueueConfig(StrictConfig):
    """The bounded queue between capture and inference."""

    capacity: int = Field(default=8, ge=1, description="Frames waiting for inference at most.")
    policy: QueuePolicy | None = Field(
        default=None,
        description="When full: drop the oldest frame, or make capture wait. "
        "Default: drop_oldest for camera, block for folder and replay.",
    )


class AgentConfig(StrictConfig):
    """The whole agent configuration file."""

    station: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="Station name; used in ids and message topics.")
    bundle: BundleConfig = Field(description="The model bundle to serve.")
    inference: InferenceConfig = Field(default_factory=InferenceConfig, description="ONNX Runtime settings.")
    source: SourceConfig = Field(description="Where frames come from; `kind` selects folder, camera or replay.")
    queue: QueueConfig = Field(default_factory=QueueConfig, description="Capture-to-inference queue.")
    sinks: list[SinkConfig] = Field(
        default_factory=lambda: [JsonlSinkConfig(kind="jsonl", path="-")],
        description="Where results go; `kind` selects jsonl or annotate. Default: JSON lines on stdout.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")
    stop_timeout_s: float = Field(
        default=20.0,
        gt=0,
        le=300,
        description="Budget for a clean stop (threads joined, services closed); keep it below the unit's "
        "TimeoutStopSec (30 s).",
    )
    status_log: StatusLogConfig = Field(
        default_factory=StatusLogConfig, description="The periodic one-line status summary in the log."
    )
    health: HealthConfig = Field(
        default_factory=HealthConfig,
        description="/healthz, /readyz and Prometheus /metrics over HTTP (loopback port 9464 by default).",
    )
    notify: NotifyConfig = Field(
        default_factory=NotifyConfig,
        description="systemd notifications (READY, WATCHDOG from the inference loop's progress, STATUS).",
    )
    mqtt: MqttConfig | None = Field(
        default=None,
        description="MQTT to the PLC/SCADA (results through a durable outbox, status, events, metrics, "
        "commands); none = no MQTT.",
    )
    s3: S3Config | None = Field(
        default=None,
        description="The S3 bucket (or S3-compatible store) for flagged uploads and model updates; none = no S3.",
    )
    # After `s3`: their validator reads the validated `s3` section.
    uploads: UploadsConfig | None = Field(
        default=None,
        description="Flagged frames (defective, uncertain, a sample of normal) uploaded to the `s3:` bucket with "
        "their result and a Ground Truth manifest line; none = no uploads.",
    )
    updates: UpdatesConfig | None = Field(
        default=None,
        description="Remote model updates: signed bundles from a channel of the s3: bucket, proven on this "
        "device (golden images) before they serve; none = bundle.path only.",
    )

    @field_validator("uploads", "updates")
    @classmethod
    def _need_s3(
        cls, value: UploadsConfig | UpdatesConfig | None, info: ValidationInfo
    ) -> UploadsConfig | UpdatesConfig | None:
        # "s3" missing from info.data means it failed validation itself: that problem is reported already.
        if value is not None and value.enabled and "s3" in info.data and info.data["s3"] is None:
            what = "upload to" if info.field_name == "uploads" else "fetch bundles from"
            raise ValueError(
                f"{info.field_name} are enabled but there is no `s3:` section (bucket, prefix...) to {what}"
            )
        return value

    def problems(self, key: str = "") -> list[str]:
        """Every path problem of the file, by key path (see StrictConfig.problems)."""
        return [
            *self.bundle.problems("bundle"),
            *self.inference.problems("inference"),
            *self.source.problems("source"),
            *(p for i, sink in enumerate(self.sinks) for p in sink.problems(f"sinks[{i}]")),
            *(self.mqtt.problems("mqtt") if self.mqtt is not None else []),
            *(self.uploads.problems("uploads") if self.uploads is not None and self.uploads.enabled else []),
            *(self.updates.problems("updates") if self.updates is not None and self.updates.enabled else []),
        ]

    def queue_policy(self) -> QueuePolicy:
        """The configured queue policy, or the source kind's default."""
        return self.queue.policy or type(self.source).default_queue_policy


def _key_path(loc: tuple[int | str, ...], data: Any) -> tuple[str, str]:
    """Turn a pydantic error location into the YAML key path, skipping union tags.

    Returns (path, extra) where extra names union members pydantic tried (e.g. 'int') for the message.
    """
    parts: list[str] = []
    extra: list[str] = []
    current = data
    for item in loc:
        if isinstance(current, dict) and item in current:
            parts.append(str(item))
            current = current[item]
        elif isinstance(current, list) and isinstance(item, int):
            parts.append(f"[{item}]")
            current = current[item] if item < len(current) else None
        elif isinstance(current, dict) and item == current.get("kind"):
            continue  # discriminated-union tag, not a key the user wrote
        elif isinstance(current, dict) or current is None:
            parts.append(str(item))  # a missing key
            current = None
        else:
            extra.append(str(item))
    path = ".".join(parts).replace(".[", "[")
    return path or "<top level>", ", ".join(extra)


def validation_problems(err: ValidationError, data: Any) -> list[str]:
    """Flatten a pydantic ValidationError into 'key.path: message' lines."""
    problems = []
    for item in err.errors(include_url=False):
        path, extra = _key_path(tuple(item["loc"]), data)
        message = item["msg"]
        scalar = not isinstance(item.get("input"), dict | list)
        if item["type"] not in ("missing", "extra_forbidden") and "input" in item and scalar:
            message = f"{message} (found {item['input']!r})"
        if extra:
            message = f"{message} [as {extra}]"
        problems.append(f"{path}: {message}")
    return problems


def parse_config(data: Any, origin: str = "<config>") -> AgentConfig:
    """Validate already-parsed YAML; raises ConfigError listing every problem."""
    if not isinstance(data, dict):
        found = "an empty document" if data is None else type(data).__name__
        raise ConfigError(f"{origin}: expected a mapping at the top level", [f"<top level>: found {found}"])
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as err:
        problems = validation_problems(err, data)
        raise ConfigError(f"{origin}: {len(problems)} problem(s) in the configuration", problems) from err


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate a YAML config file; raises ConfigError with `.problems` as 'key.path: message'."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file", [f"{path}: {err.strerror or err}"]) from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "unknown position"
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        detail = f"{context}; {problem}" if context else problem
        raise ConfigError(f"{path}: not valid YAML", [f"{path}: {where}: YAML syntax error: {detail}"]) from err
    return parse_config(data, str(path))


def resolve_secret(name: str) -> str | None:
    """A secret from `$CREDENTIALS_DIRECTORY/name` (systemd LoadCredential=), else `$LINESIDE_<NAME>`.

    Returns None when neither is set. Trailing newlines of credential files are stripped.
    """
    if not _SECRET_NAME.match(name):
        raise ValueError(f"secret name must match {_SECRET_NAME.pattern}, got {name!r}")
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        candidate = Path(cred_dir) / name
        if candidate.is_file():
            return candidate.read_text(encoding="utf-8").rstrip("\r\n")
    env_name = "LINESIDE_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper()
    return os.environ.get(env_name)
