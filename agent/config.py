"""The agent's configuration: one YAML file validated by pydantic, plus secrets from systemd credentials.

Every model forbids unknown keys and documents every field, so `lineside-agent check-config` can name
each problem by its key path. Nothing here reads the environment at import time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lineside.agent.errors import ConfigError
from lineside.agent.imaging import DEFAULT_MAX_PIXELS

EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h; systemd units list it in RestartPreventExitStatus=

ProviderName = Literal["tensorrt", "cuda", "cpu"]
QueuePolicy = Literal["drop_oldest", "block"]
DEFAULT_PATTERNS = ["*.png", "*.tif", "*.tiff", "*.jpg", "*.jpeg"]
_SECRET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BundleConfig(_Config):
    """Where the model bundle lives."""

    path: Path = Field(description="Folder holding the model bundle (manifest.json + ONNX files).")


class InferenceConfig(_Config):
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


class _SourceBase(_Config):
    default_queue_policy: ClassVar[QueuePolicy] = "block"

    name: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Source name in results; part of every result id, so keep it stable. Default: the kind.",
    )
    bits_stored: int | None = Field(
        default=None, ge=8, le=16, description="Significant bits of 16-bit pixels (e.g. 12); None = all 16."
    )
    max_pixels: int = Field(
        default=DEFAULT_MAX_PIXELS,
        gt=0,
        description="Images with more pixels are refused (decompression bombs).",
    )

    @property
    def source_name(self) -> str:
        return self.name or str(getattr(self, "kind", "source"))


class FolderSourceConfig(_SourceBase):
    """A hot folder the X-ray system writes finished images into."""

    kind: Literal["folder"] = Field(description="Selects the hot-folder source.")
    path: Path = Field(description="The hot folder watched for new images (top level only).")
    done_dir: Path | None = Field(default=None, description="Where inspected images go; default PATH/done.")
    failed_dir: Path | None = Field(
        default=None,
        description="Where undecodable or failed images go, with NAME.error.json; default PATH/failed.",
    )
    state_dir: Path | None = Field(
        default=None, description="Where the exactly-once ledger is kept; default PATH/.lineside."
    )
    settle_seconds: float = Field(
        default=2.0,
        ge=0,
        description="A file is complete once its size and mtime stayed unchanged this long.",
    )
    poll_interval: float = Field(default=0.5, gt=0, description="Seconds between scans of the hot folder.")
    retry_seconds: float = Field(
        default=10.0,
        ge=0,
        description="Delay before a file whose result could not be stored is offered again.",
    )
    patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PATTERNS),
        min_length=1,
        description="Glob patterns (case-insensitive) of image file names to pick up.",
    )
    part_id_regex: str | None = Field(
        default=None,
        description="Regex searched in the file name; named groups `part` and `view` give part id and view.",
    )
    sidecar: bool = Field(
        default=True,
        description="Read NAME.json next to an image ({'part_id': ..., 'view': ...}) when present.",
    )
    sidecar_required: bool = Field(
        default=False, description="Wait for the NAME.json sidecar before picking an image up."
    )

    @field_validator("part_id_regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            pattern = re.compile(value)
        except re.error as err:
            raise ValueError(f"not a valid regular expression: {err}") from err
        unknown = set(pattern.groupindex) - {"part", "view"}
        if not pattern.groupindex or unknown:
            raise ValueError(f"expected named groups 'part' and/or 'view', found {sorted(pattern.groupindex)}")
        return value

    @model_validator(mode="after")
    def _default_dirs(self) -> FolderSourceConfig:
        self.done_dir = self.done_dir or self.path / "done"
        self.failed_dir = self.failed_dir or self.path / "failed"
        self.state_dir = self.state_dir or self.path / ".lineside"
        return self


class CameraSourceConfig(_SourceBase):
    """A live camera or frame grabber read through OpenCV."""

    default_queue_policy: ClassVar[QueuePolicy] = "drop_oldest"

    kind: Literal["camera"] = Field(description="Selects the live camera source.")
    uri: int | str = Field(
        description="Device index (0), RTSP/HTTP URL, or a GStreamer pipeline (a string containing '!')."
    )
    fps_limit: float = Field(default=0.0, ge=0, description="Deliver at most this many frames per second; 0 = all.")
    reconnect_min_s: float = Field(default=0.5, gt=0, description="First delay before reconnecting, seconds.")
    reconnect_max_s: float = Field(default=30.0, gt=0, description="Longest delay between reconnects, seconds.")
    max_read_failures: int = Field(
        default=3, ge=1, description="Consecutive failed reads after which the camera is reopened."
    )

    @model_validator(mode="after")
    def _backoff_order(self) -> CameraSourceConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) must be at least reconnect_min_s ({self.reconnect_min_s})"
            )
        return self


class ReplaySourceConfig(_SourceBase):
    """Recorded images replayed as a stream, for soak tests and benchmarks."""

    kind: Literal["replay"] = Field(description="Selects the replay source.")
    path: Path = Field(description="Folder of images, replayed in name order.")
    patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PATTERNS), min_length=1, description="Glob patterns of images."
    )
    rate_hz: float = Field(default=0.0, ge=0, description="Frames per second; 0 = as fast as the pipeline takes.")
    loop: bool = Field(default=False, description="Start over after the last image.")
    max_frames: int | None = Field(default=None, ge=1, description="Stop after this many frames; None = no limit.")


SourceConfig = Annotated[FolderSourceConfig | CameraSourceConfig | ReplaySourceConfig, Field(discriminator="kind")]


class QueueConfig(_Config):
    """The bounded queue between capture and inference."""

    capacity: int = Field(default=8, ge=1, description="Frames waiting for inference at most.")
    policy: QueuePolicy | None = Field(
        default=None,
        description="When full: drop the oldest frame, or make capture wait. "
        "Default: drop_oldest for camera, block for folder and replay.",
    )


class JsonlSinkConfig(_Config):
    """Results as JSON lines, to a file or stdout."""

    kind: Literal["jsonl"] = Field(description="Selects the JSON-lines sink.")
    path: str = Field(description="File to append to, or '-' for stdout.")
    fsync: bool = Field(default=False, description="fsync after every line (survives power loss, costs I/O).")
    durable: bool = Field(
        default=True,
        description="A frame is acknowledged to its source only after this sink stored the result.",
    )


class AnnotateSinkConfig(_Config):
    """8-bit JPEG copies of the images with boxes and verdict drawn, for people."""

    kind: Literal["annotate"] = Field(description="Selects the annotated-image sink.")
    folder: Path = Field(description="Folder the annotated JPEGs are written to.")
    only_defective: bool = Field(default=False, description="Write only images judged defective.")
    jpeg_quality: int = Field(default=90, ge=1, le=100, description="JPEG quality, 1-100.")
    durable: bool = Field(
        default=False,
        description="A frame is acknowledged to its source only after this sink stored the result.",
    )


SinkConfig = Annotated[JsonlSinkConfig | AnnotateSinkConfig, Field(discriminator="kind")]


class AgentConfig(_Config):
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
