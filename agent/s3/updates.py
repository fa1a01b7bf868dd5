"""Remote model updates: the `updates:` section and the service that follows a channel.

Every `poll_seconds` the service reads its channel's pointer (`<prefix>/models/<channel>/latest.json`,
a conditional GET on the last ETag). A pointer naming another bundle is checked step by step, and the
first step that fails rejects the bundle while the running one keeps serving:

    pointer    JSON of the ChannelPointer schema, published to this channel
    signature  Ed25519 by `public_key` (when set; an unsigned pointer is then refused)
    space      the archive's size within `max_bundle_mb`; free disk for the archive, its extracted copy
               and `min_free_mb` (too little free disk is retried: it may be freed without a new pointer)
    download   into staging/, at most `size` bytes; size and sha256 must be the pointer's
    verify     extracted (tar 'data' filter), every file's sha256 against the manifest, the bundle id
               and version the pointer names, golden images present
    prove      loaded on the configured providers, golden images replayed (always, whatever
               inference.verify_golden says): the bundle works on this device before it sees a frame
    swap       `Agent.swap_engine` between two frames; active.json records it for the next start

A rejected pointer is remembered (its ETag, in updates.json) until the pointer changes; an unreachable
store, a missing bucket or denied access is retried at the next poll with backoff. `activate-bundle`
(MQTT) goes through `Agent.activate_bundle` to `activate()`: a kept bundle proven and swapped the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field, ValidationError

from lineside.agent.bundle.loader import extract_archive, load_bundle
from lineside.agent.errors import BundleError, ConfigError, InferenceError, SignatureError, UpdateError
from lineside.agent.plugins import StrictConfig, path_problems
from lineside.agent.s3.bundle_store import BundleStore, bundle_id_at
from lineside.agent.s3.config import S3Config, client_error, client_for
from lineside.agent.s3.signing import CHANNEL_PATTERN, ChannelPointer, load_public_key, pointer_key, verify_pointer

if TYPE_CHECKING:
    from lineside.agent.runtime import Agent, Engine

logger = logging.getLogger(__name__)

MB = 1024 * 1024
_MAX_POINTER_BYTES = 64 * 1024
_CHUNK = 1 << 20


class UpdatesConfig(StrictConfig):
    """Signed model bundles from a channel of the `s3:` bucket, proven on this device before they serve."""

    enabled: bool = Field(default=True, description="Follow the channel; false = serve bundle.path only.")
    channel: str = Field(
        default="stable",
        pattern=CHANNEL_PATTERN,
        description="Channel to follow: canary (one station first), stable, or any [a-z0-9-] name.",
    )
    poll_seconds: float = Field(default=60.0, ge=1, le=86400, description="Seconds between two reads of the pointer.")
    backoff_max_s: float = Field(
        default=900.0,
        ge=1,
        le=86400,
        description="While the store cannot be reached the wait doubles from poll_seconds up to this.",
    )
    public_key: Path | None = Field(
        default=None,
        description="Ed25519 public key (PEM) of the publisher; when set, unsigned or badly signed bundles are "
        "refused. None = signatures are not checked (the sha256 and golden checks still are).",
    )
    keep: int = Field(default=3, ge=0, le=50, description="Previously active bundles kept on disk for rollback.")
    bundles_dir: Path = Field(
        default=Path("/var/lib/lineside/bundles"),
        description="Where kept bundles (store/), downloads in progress (staging/) and active.json live.",
    )
    max_bundle_mb: float = Field(
        default=4096.0, gt=0, description="A pointer announcing a larger archive is refused before any download."
    )
    min_free_mb: float = Field(
        default=512.0,
        ge=0,
        description="Free disk left in bundles_dir after the archive and its extracted copy; else retried later.",
    )
    auto_activate: bool = Field(
        default=True,
        description="true: swap a proven bundle in at once. false: download, prove and keep it (event "
        "update_ready); it serves after an activate-bundle command.",
    )
    swap_timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="How long the inference thread may take to let go of the old engine."
    )

    def problems(self, key: str) -> list[str]:
        found = path_problems(self.bundles_dir, f"{key}.bundles_dir", write=True, create=True)
        key_problems = path_problems(self.public_key, f"{key}.public_key", kind="file")
        if self.public_key is not None and not key_problems:
            try:
                load_public_key(self.public_key)
            except SignatureError as err:
                key_problems = [f"{key}.public_key: {err}"]
        return [*found, *key_problems]


class UpdatesService:
    """Follows one channel; see the module docstring. `poll_once()` and `activate()` are its two doors."""

    section: ClassVar[str] = "updates"
    config_class: ClassVar[type[StrictConfig]] = UpdatesConfig
    name = "updates"

    def __init__(self, agent: Agent, config: UpdatesConfig, s3: S3Config) -> None:
        self.agent = agent
        self.config = config
        self.s3 = s3
        self.store = BundleStore(config.bundles_dir, config.keep)
        self.pointer_key = pointer_key(s3.key("models"), config.channel)
        self.pointer_uri = f"s3://{s3.bucket}/{self.pointer_key}"
        try:
            self.public_key = None if config.public_key is None else load_public_key(config.public_key)
        except SignatureError as err:
            raise ConfigError("updates: the public key cannot be used", [f"updates.public_key: {err}"]) from err
        self._client: Any = None
        self._lock = threading.Lock()  # one poll or activation at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts = {"polls": 0, "downloads": 0, "rejected": 0, "activated": 0, "failed": 0}
        self._failures = 0  # consecutive transient failures (backoff)
        self._ready: str | None = None  # proven, waiting for activate-bundle (auto_activate false)
        state = self.store.read_state()
        same_channel = state.get("channel") == config.channel and state.get("bucket") == s3.bucket
        self._etag: str | None = state.get("etag") if same_channel else None
        self._nothing_logged = False

    @classmethod
    def from_agent(cls, agent: Agent) -> UpdatesService | None:
        config: UpdatesConfig | None = getattr(agent.config, "updates", None)
        if config is None or not config.enabled:
            return None
        s3: S3Config | None = getattr(agent.config, "s3", None)
        if s3 is None:  # AgentConfig refuses this already; kept for configs built some other way
            raise ConfigError("updates: enabled without an s3: section", ["updates: needs the s3: section"])
        return cls(agent, config, s3)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, stop: threading.Event) -> None:
        self._stop = stop
        self.agent.bundle_activator = self.activate
        self._thread = threading.Thread(target=self._run, name="lineside-updates", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self.agent.bundle_activator == self.activate:
            self.agent.bundle_activator = None
        self._stop.set()
        if self._thread is not None:
            # A download stops within a chunk; proving a bundle (seconds) cannot be interrupted.
            self._thread.join(self.agent.config.stop_timeout_s / 4)
            self._thread = None

    def counters(self) -> dict[str, int]:
        """polls, downloads, rejected (bundles refused), activated, failed (store unreachable, retried)."""
        return dict(self._counts)

    def _run(self) -> None:
        try:
            with self._lock:
                self._adopt_running_bundle()
        except Exception:
            logger.exception("updates: cannot record the running bundle in %s", self.config.bundles_dir)
        while not self._stop.is_set():
            self.poll_once()
            if self._stop.wait(self._next_wait()):
                return

    def _next_wait(self) -> float:
        if self._failures == 0:
            return self.config.poll_seconds
        ceiling = max(self.config.backoff_max_s, self.config.poll_seconds)
        return min(self.config.poll_seconds * 2 ** (self._failures - 1), ceiling)

    def _adopt_running_bundle(self) -> None:
        """Keep the bundle served now in the store (so it can be rolled back to) and record it as active."""
        self.store.clean_staging()  # leftovers of a crash mid-download
        engine: Any = self.agent.engine
        root = getattr(getattr(engine, "bundle", None), "root", None)
        if engine is None or root is None:
            return  # an engine that is not a bundle (tests' stand-ins)
        manifest = engine.manifest
        self.store.adopt(Path(root), manifest.bundle_id)
        record = self.store.active()
        if record is None or record.bundle_id != manifest.bundle_id:
            how = "adopted" if record is None or manifest.bundle_id == self._configured_id() else "fallback"
            self.store.record_active(manifest, how, self._configured_id())

    def _configured_id(self) -> str | None:
        return bundle_id_at(self.agent.config.bundle.path)

    # -- polling ---------------------------------------------------------------------------------

    def poll_once(self) -> str:
        """Read the pointer and act on it; returns what happened (unchanged, empty, current, activated,
        ready, rejected, failed). Never raises: refusals and failures become events, logs and counters."""
        with self._lock:
            try:
                outcome = self._poll()
            except UpdateError as err:
                self._report(err)
                return "failed" if err.transient else "rejected"
            except Exception as err:  # a bug must not end the polling thread
                logger.exception("updates: poll failed")
                self._report(UpdateError("poll", f"{type(err).__name__}: {err}", transient=True))
                return "failed"
            finally:
                self.store.clean_staging()
                self._counts["polls"] += 1  # counted once done: its events and counters are out
            if self._failures:
                logger.info("updates: %s can be read again", self.pointer_uri)
            self._failures = 0
            return outcome

    def _poll(self) -> str:
        raw, etag = self._get_pointer()
        if raw is None:
            return "unchanged" if etag else "empty"
        pointer: ChannelPointer | None = None
        try:
            pointer = self._parse(raw)
            outcome = self._apply(pointer)
        except UpdateError as err:
            if not err.transient:
                self._remember(etag, "rejected", pointer)
            if pointer is not None:
                err.bundle_id, err.version = pointer.bundle_id, pointer.version
            raise
        self._remember(etag, outcome, pointer)
        return outcome

    def _s3(self) -> Any:
        if self._client is None:
            self._client = client_for(self.s3)
        return self._client

    def _get_pointer(self) -> tuple[bytes | None, str | None]:
        """(body, etag); (None, etag) when unchanged since the last read, (None, None) when nothing is published."""
        from botocore.exceptions import BotoCoreError, ClientError

        args: dict[str, Any] = {"Bucket": self.s3.bucket, "Key": self.pointer_key}
        if self._etag:
            args["IfNoneMatch"] = self._etag
        try:
            response = self._s3().get_object(**args)
            body = response["Body"].read(_MAX_POINTER_BYTES + 1)
        except ClientError as err:
            code, status, _ = client_error(err)
            if status == 304 or code in ("304", "NotModified"):
                return None, self._etag
            if code in ("NoSuchKey", "404"):
                if not self._nothing_logged:
                    logger.info("updates: nothing published at %s yet", self.pointer_uri)
                    self._nothing_logged = True
                return None, None
            raise UpdateError("poll", f"{self.pointer_uri}: {code or status}: {err}", transient=True) from err
        except (BotoCoreError, OSError) as err:
            raise UpdateError("poll", f"{self.pointer_uri}: {err}", transient=True) from err
        self._nothing_logged = False
        return body, str(response.get("ETag") or "") or None

    def _parse(self, raw: bytes) -> ChannelPointer:
        if len(raw) > _MAX_POINTER_BYTES:
            raise UpdateError("pointer", f"{self.pointer_uri} is larger than {_MAX_POINTER_BYTES} bytes")
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise UpdateError("pointer", f"{self.pointer_uri} is not JSON ({err})") from err
        try:
            pointer = ChannelPointer.model_validate(data)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '<pointer>'}: {e['msg']}" for e in err.errors(include_url=False)
            )
            raise UpdateError("pointer", f"{self.pointer_uri} is not a channel pointer: {problems}") from err
        if pointer.channel != self.config.channel:
            raise UpdateError(
                "pointer",
                f"{self.pointer_uri} was published to channel {pointer.channel!r}, not {self.config.channel!r}",
            )
        return pointer

    def _remember(self, etag: str | None, outcome: str, pointer: ChannelPointer | None) -> None:
        self._etag = etag
        try:
            self.store.write_state(
                {
                    "bucket": self.s3.bucket,
                    "channel": self.config.channel,
                    "etag": etag,
                    "outcome": outcome,
                    "bundle_id": pointer.bundle_id if pointer else None,
                    "version": pointer.version if pointer else None,
                    "ready": self._ready,
                }
            )
        except OSError as err:  # only the memory across restarts is lost
            logger.warning("updates: cannot write %s: %s", self.store.root / "updates.json", err)

    def _apply(self, pointer: ChannelPointer) -> str:
        if self.public_key is not None:
            try:
                verify_pointer(pointer, self.public_key)
            except SignatureError as err:
                raise UpdateError("signature", f"{self.pointer_uri}: {err}") from err
        running = self.agent.status().bundle_id
        if pointer.bundle_id == running:
            return "current"
        if pointer.bundle_id == self._ready:
            return "ready"
        logger.info(
            "updates: channel %s offers bundle %s (%s); serving %s",
            self.config.channel,
            pointer.version,
            pointer.bundle_id,
            self.agent.status().bundle_version,
        )
        self.agent.events.publish(
            "update_available",
            f"channel {self.config.channel} offers bundle {pointer.version}",
            channel=self.config.channel,
            bundle_id=pointer.bundle_id,
            version=pointer.version,
        )
        kept = self.store.has(pointer.bundle_id)
        root = self.store.path_of(pointer.bundle_id) if kept else self._download(pointer)
        try:
            if not self.config.auto_activate:
                engine = self._prove(root)
                engine.close()
                self._ready = pointer.bundle_id
                self.store.prune(also_keep=(pointer.bundle_id,))
                self.agent.events.publish(
                    "update_ready",
                    f"bundle {pointer.version} is proven and kept; activate-bundle serves it",
                    channel=self.config.channel,
                    bundle_id=pointer.bundle_id,
                    version=pointer.version,
                )
                return "ready"
            self._activate(root, "update")
        except UpdateError:
            if not kept:
                self.store.remove(pointer.bundle_id)  # a refused download leaves nothing behind
            raise
        return "activated"

    def _download(self, pointer: ChannelPointer) -> Path:
        """Download, check and extract the archive; returns its folder in the store (files verified)."""
        if pointer.size > self.config.max_bundle_mb * MB:
            raise UpdateError(
                "space",
                f"the archive has {pointer.size / MB:.1f} MB, "
                f"over updates.max_bundle_mb ({self.config.max_bundle_mb:g})",
            )
        needed = 2 * pointer.size + int(self.config.min_free_mb * MB)  # archive + extracted copy + headroom
        free = self.store.free_bytes()
        if free < needed:
            raise UpdateError(
                "space",
                f"{free / MB:.0f} MB free in {self.config.bundles_dir}, need {needed / MB:.0f} MB (the archive of "
                f"{pointer.size / MB:.1f} MB, its extracted copy and updates.min_free_mb)",
                transient=True,
            )
        staging = self.store.new_staging()
        try:
            archive = staging / "bundle.tar.gz"
            self._fetch_archive(pointer, archive)
            try:
                root = extract_archive(archive, staging / "bundle")
            except BundleError as err:
                raise UpdateError("verify", str(err)) from err
            archive.unlink()  # the space is the extracted copy's now
            try:
                loaded = load_bundle(root)  # every file's sha256
            except BundleError as err:
                raise UpdateError("verify", str(err)) from err
            manifest = loaded.manifest
            if (manifest.bundle_id, manifest.version) != (pointer.bundle_id, pointer.version):
                raise UpdateError(
                    "verify",
                    f"the archive holds bundle {manifest.bundle_id} version {manifest.version}, the pointer names "
                    f"{pointer.bundle_id} version {pointer.version}",
                )
            if not manifest.golden:
                raise UpdateError("verify", "the bundle has no golden images: it cannot be proven on this device")
            return self.store.install(root, manifest.bundle_id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _fetch_archive(self, pointer: ChannelPointer, target: Path) -> None:
        from botocore.exceptions import ClientError

        uri = f"s3://{self.s3.bucket}/{pointer.key}"
        self._counts["downloads"] += 1
        try:
            response = self._s3().get_object(Bucket=self.s3.bucket, Key=pointer.key)
        except ClientError as err:
            code, status, _ = client_error(err)
            if code in ("NoSuchKey", "404"):
                raise UpdateError("download", f"the pointer names {uri}, which does not exist") from err
            raise UpdateError("download", f"{uri}: {code or status}: {err}", transient=True) from err
        except Exception as err:
            raise UpdateError("download", f"{uri}: {err}", transient=True) from err
        digest = hashlib.sha256()
        written = 0
        started = time.monotonic()
        with target.open("wb") as fh:
            body = response["Body"]
            while True:
                if self._stop.is_set():
                    raise UpdateError("download", "the agent is stopping", transient=True)
                try:
                    chunk = body.read(_CHUNK)
                except Exception as err:  # a connection cut mid-body: try again later
                    raise UpdateError("download", f"{uri}: cut after {written} bytes ({err})", transient=True) from err
                if not chunk:
                    break
                written += len(chunk)
                if written > pointer.size:
                    body.close()
                    raise UpdateError("download", f"{uri} is larger than the {pointer.size} bytes the pointer says")
                digest.update(chunk)
                fh.write(chunk)
        if written != pointer.size:
            raise UpdateError(
                "download", f"{uri} has {written} bytes, the pointer says {pointer.size} (truncated upload?)"
            )
        if digest.hexdigest() != pointer.sha256:
            raise UpdateError("download", f"{uri} has sha256 {digest.hexdigest()}, the pointer says {pointer.sha256}")
        logger.info("updates: downloaded %s (%.1f MB in %.1f s)", uri, written / MB, time.monotonic() - started)

    # -- proving and activating ------------------------------------------------------------------

    def _prove(self, root: Path) -> Engine:
        """The bundle loaded on the configured providers with its golden images replayed, or UpdateError."""
        from lineside.agent.runtime import engine_for

        try:
            return engine_for(root, self.agent.config.inference, verify_golden=True)
        except (BundleError, InferenceError) as err:
            raise UpdateError("prove", str(err)) from err
        except Exception as err:  # ONNX Runtime and numpy raise their own types
            raise UpdateError("prove", f"{type(err).__name__}: {err}") from err

    def _activate(self, root: Path, how: str) -> dict[str, Any]:
        engine = self._prove(root)
        before = self.agent.status()
        try:
            self.agent.swap_engine(engine, timeout=self.config.swap_timeout_s)
        except Exception as err:
            engine.close()
            raise UpdateError("swap", f"{type(err).__name__}: {err}", transient=True) from err
        manifest = engine.manifest
        self.store.record_active(manifest, how, self._configured_id())  # type: ignore[arg-type]
        if self._ready == manifest.bundle_id:
            self._ready = None
        self.store.prune(also_keep=tuple(r for r in (self._ready,) if r))
        self._counts["activated"] += 1
        logger.info("updates: bundle %s (%s) active (%s)", manifest.version, manifest.bundle_id, how)
        self.agent.events.publish(
            "bundle_activated",
            f"bundle {before.bundle_version} -> {manifest.version} ({how})",
            bundle_id=manifest.bundle_id,
            version=manifest.version,
            previous_bundle_id=before.bundle_id,
            previous_version=before.bundle_version,
            how=how,
            channel=self.config.channel,
        )
        return {
            "bundle_id": manifest.bundle_id,
            "version": manifest.version,
            "previous_bundle_id": before.bundle_id,
            "previous_version": before.bundle_version,
        }

    def activate(self, *, bundle_id: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Serve a kept bundle (by id or version), proven like a download; ValueError says why not.

        The channel's pointer is not re-read: a rollback holds until the channel publishes another bundle.
        """
        if not self._lock.acquire(timeout=self.config.swap_timeout_s):
            raise ValueError("an update is in progress; try again")
        try:
            stored = self.store.find(bundle_id=bundle_id, version=version)
            wanted = bundle_id if bundle_id is not None else version
            if stored is None:
                kept = ", ".join(f"{b.version} ({b.bundle_id})" for b in self.store.bundles()) or "none"
                raise ValueError(f"no kept bundle has {'id' if bundle_id else 'version'} {wanted!r}; kept: {kept}")
            status = self.agent.status()
            if stored.bundle_id == status.bundle_id:
                return {"bundle_id": stored.bundle_id, "version": stored.version, "changed": False}
            try:
                return {**self._activate(stored.path, "command"), "changed": True}
            except UpdateError as err:
                err.bundle_id, err.version = stored.bundle_id, stored.version
                self._report(err, how="command")
                raise ValueError(f"bundle {stored.version} refused at step {err.step}: {err}") from err
        finally:
            self._lock.release()

    # -- reporting -------------------------------------------------------------------------------

    def _report(self, err: UpdateError, how: str = "update") -> None:
        data = {
            "step": err.step,
            "reason": str(err),
            "channel": self.config.channel,
            "bundle_id": err.bundle_id,
            "version": err.version,
            "how": how,
        }
        serving = self.agent.status().bundle_version
        if err.transient and how == "update":
            self._counts["failed"] += 1
            self._failures += 1
            if self._failures == 1:  # once per outage, not every poll
                logger.warning("updates: %s failed: %s; retrying, still serving %s", err.step, err, serving)
                self.agent.events.publish(
                    "update_failed", f"update check failed at {err.step}: {err}", retry_in_s=self._next_wait(), **data
                )
            else:
                logger.debug("updates: %s failed again: %s", err.step, err)
            return
        self._counts["rejected"] += 1
        logger.error(
            "updates: bundle %s refused at step %s: %s; still serving %s", data["version"], err.step, err, serving
        )
        self.agent.events.publish(
            "update_rejected", f"bundle {data['version']} refused at {err.step}: {err}; still serving {serving}", **data
        )
