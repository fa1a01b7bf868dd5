"""The daemon as one object: `Agent` owns every lifecycle (Frigate's app object is the model).

Start order: engine (bundle verified, sessions created, golden images replayed) -> source and sinks ->
pipeline (capture, inference, dispatch threads) -> services (in `services.PLUGINS` order). Stop order is
the reverse, inside the stop budget (`stop_timeout_s`, below the unit's TimeoutStopSec). A failure at
any step of the start closes what was started, in reverse, and re-raises: nothing is left running.

Other parts use three things: `status()` (one consistent snapshot), `events` (publish/subscribe), and
`swap_engine()` (a new bundle between two frames).
"""

from __future__ import annotations

import enum
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from lineside.agent.config import AgentConfig, InferenceConfig
from lineside.agent.errors import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    BundleError,
    ConfigError,
    InferenceError,
    SourceError,
)
from lineside.agent.events import EventHub
from lineside.agent.pipeline import Inspector, Pipeline
from lineside.agent.results import Frame
from lineside.agent.services import PLUGINS as SERVICE_PLUGINS
from lineside.agent.services import Service
from lineside.agent.sinks import Sink, create_sink
from lineside.agent.sources import FrameSource, create_source

logger = logging.getLogger(__name__)


class Engine(Inspector, Protocol):
    """An inspector the agent owns: it closes it when done with it."""

    def close(self) -> None: ...


def engine_for(path: Path, inference: InferenceConfig, *, verify_golden: bool | None = None) -> Engine:
    """An engine for the bundle at `path` with the inference settings (verified, warmed up, golden-checked
    unless `verify_golden` (default: the setting's) says otherwise)."""
    # Imported here: onnxruntime is heavy, and check-config must work without it.
    from lineside.agent.inference.engine import InferenceEngine

    return InferenceEngine.load(
        path,
        providers=list(inference.providers),
        device_id=inference.device_id,
        require_gpu=inference.require_gpu,
        trt_cache_dir=inference.trt_cache_dir,
        trt_fp16=inference.trt_fp16,
        verify_golden=inference.verify_golden if verify_golden is None else verify_golden,
        session=inference.session_settings(),
        skip_unneeded_models=inference.skip_unneeded_models,
    )


StartupReport = Callable[..., None]  # (kind, message, **data): an event published once services listen


def load_engine(config: AgentConfig, report: StartupReport | None = None) -> Engine:
    """The engine to start with: the bundle remote updates last activated (`active.json` under
    `updates.bundles_dir`), else `bundle.path`. An activated bundle that no longer verifies is reported
    (`bundle_fallback`) and `bundle.path` serves instead; so does a bundle.path changed by hand since."""
    updates = getattr(config, "updates", None)
    if updates is not None and updates.enabled:
        from lineside.agent.s3.bundle_store import BundleStore, bundle_id_at

        store = BundleStore(updates.bundles_dir, updates.keep)
        record = store.active()
        configured = bundle_id_at(config.bundle.path)
        if record is not None and record.configured_bundle_id not in (None, configured):
            # Someone deployed another bundle at bundle.path by hand since: that deliberate act wins.
            logger.info(
                "bundle.path %s holds bundle %s, not %s as when %s was activated: serving bundle.path",
                config.bundle.path,
                configured,
                record.configured_bundle_id,
                record.version,
            )
            record = None
        if record is not None:
            try:
                return engine_for(store.path_of(record.bundle_id), config.inference)
            except (BundleError, InferenceError) as err:
                message = (
                    f"activated bundle {record.version} ({record.bundle_id}) cannot be served ({err}); "
                    f"serving bundle.path {config.bundle.path}"
                )
                logger.error("%s", message)
                if report is not None:
                    report(
                        "bundle_fallback", message, bundle_id=record.bundle_id, version=record.version, reason=str(err)
                    )
    return engine_for(config.bundle.path, config.inference)


class AgentState(enum.StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class AgentStatus:
    """What the agent is doing, as one consistent snapshot (services read this, never each other)."""

    state: AgentState
    station: str
    bundle_id: str | None
    bundle_version: str | None
    providers: list[str]
    counters: dict[str, Any]
    last_progress_age_s: float  # seconds since inference and capture last showed life (Pipeline.last_progress)
    started_at: datetime | None
    services: list[str] = field(default_factory=list)
    failure: str | None = None
    paused: bool = False
    source_problem: str | None = None  # why the source cannot deliver now (hot folder gone), else None
    queue_depths: dict[str, int] = field(default_factory=dict)  # services' own queues (mqtt_outbox)
    service_counters: dict[str, dict[str, int]] = field(default_factory=dict)  # per service: its counters()


class Agent:
    """Builds, starts, runs, swaps and stops everything the daemon is made of; see the module docstring.

    `engine_loader` and `sinks` may be given instead of the config's (benchmarks use a null sink, tests
    a recording engine); `services` replaces the registered services.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        engine_loader: Callable[[AgentConfig], Engine] | None = None,
        sinks: Sequence[Sink] | None = None,
        services: Sequence[Service] | None = None,
        stop_event: threading.Event | None = None,
    ) -> None:
        self.config = config
        self.stop_event = stop_event or threading.Event()
        self.events = EventHub()
        self._engine_loader = engine_loader
        self._given_sinks = None if sinks is None else list(sinks)
        self._given_services = None if services is None else list(services)
        self._lock = threading.RLock()
        self._state = AgentState.CREATED
        self._failure: str | None = None
        self._started_at: datetime | None = None
        self._signals = 0  # SIGTERM/SIGINT received; a second one exits at once
        self.engine: Engine | None = None
        self.source: FrameSource | None = None
        self.sinks: list[Sink] = []
        self.pipeline: Pipeline | None = None
        self.services: list[Service] = []  # the started ones, in start order
        # Set by the updates service while it runs: activate_bundle() goes through it.
        self.bundle_activator: Callable[..., dict[str, Any]] | None = None
        self._startup_events: list[tuple[str, str, dict[str, Any]]] = []  # published once services listen

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start everything in order; on any failure close what started (reverse) and re-raise."""
        self._set_state(AgentState.STARTING)
        try:
            if self._engine_loader is not None:
                self.engine = self._engine_loader(self.config)
            else:
                self.engine = load_engine(
                    self.config, lambda kind, message, **data: self._startup_events.append((kind, message, data))
                )
            if self.stop_event.is_set():
                return  # stopped while the bundle loaded: nothing more to start
            self.source = create_source(self.config.source, station=self.config.station)
            # Services are built (not started) before the pipeline: one may bring a sink of its own
            # (MQTT's durable outbox), which must take results from the first frame on.
            planned = (
                self._given_services
                if self._given_services is not None
                else [s for plugin in SERVICE_PLUGINS if (s := plugin.from_agent(self)) is not None]
            )
            self.sinks = [
                *(self._given_sinks if self._given_sinks is not None else [create_sink(c) for c in self.config.sinks]),
                *(sink for service in planned for sink in getattr(service, "sinks", list)()),
            ]
            self.pipeline = Pipeline(
                self.source,
                self.engine,
                self.sinks,
                self.config.queue,
                policy=self.config.queue_policy(),
                stop_event=self.stop_event,
                events=self.events,
                join_timeout=self.config.stop_timeout_s / 4,
            )
            self.pipeline.start()
            for service in planned:
                try:
                    service.start(self.stop_event)
                except Exception as err:
                    self.events.publish("service_failed", f"service {service.name} failed to start: {err}")
                    raise
                self.services.append(service)
        except BaseException as err:
            self._failure = f"{type(err).__name__}: {err}"
            self._teardown()
            self._set_state(AgentState.FAILED)
            raise
        self._started_at = datetime.now(UTC)
        self._set_state(AgentState.RUNNING)
        for kind, message, data in self._startup_events:  # now MQTT & co. hear them
            self.events.publish(kind, message, **data)
        self._startup_events.clear()
        version = self.engine.manifest.version
        self.events.publish("started", f"station {self.config.station} serving bundle {version}", version=version)
        logger.info(
            "agent running: station %s, bundle %s, providers %s, services %s",
            self.config.station,
            version,
            ",".join(self.engine.providers_in_use),
            ",".join(s.name for s in self.services) or "none",
        )

    def wait(self) -> None:
        """Block until stopped (signal, `stop()`) or a finite source is exhausted."""
        while not self.stop_event.is_set():
            if self.pipeline is None or self.pipeline.finished:
                return
            self.stop_event.wait(0.5)

    def stop(self) -> None:
        """Stop everything in reverse start order, inside `stop_timeout_s`. Safe to call twice."""
        with self._lock:
            if self._state in (AgentState.STOPPED, AgentState.FAILED, AgentState.STOPPING):
                return
            self._set_state(AgentState.STOPPING)
        self.events.publish("stopping", f"station {self.config.station} stopping")
        start = time.monotonic()
        self._teardown()
        self._set_state(AgentState.STOPPED)
        took = time.monotonic() - start
        if took > self.config.stop_timeout_s:
            logger.warning("stopping took %.1f s, beyond stop_timeout_s %.1f s", took, self.config.stop_timeout_s)

    def _teardown(self) -> None:
        self.stop_event.set()
        for service in reversed(self.services):
            try:
                service.close()
            except Exception:
                logger.exception("closing service %s failed", service.name)
        self.services = []
        if self.pipeline is not None:
            self.pipeline.stop()  # joins its threads, closes the source and the sinks
            logger.info("stopped; counters: %s", json.dumps(self.pipeline.stats(), sort_keys=True))
        else:
            # Built but never handed to a pipeline (a failure in between): close them here.
            for closable in [*self.sinks, *([self.source] if self.source is not None else [])]:
                try:
                    closable.close()
                except Exception:
                    logger.exception("closing %s failed", closable.name)
        if self.engine is not None:
            self.engine.close()

    def run(self) -> int:
        """The daemon's main: signal handlers first (a SIGTERM while the bundle loads stops cleanly), then
        start, wait, stop. Returns the process exit code."""
        previous = self._install_signal_handlers()
        try:
            try:
                self.start()
            except (BundleError, InferenceError) as err:
                logger.error("cannot serve bundle %s: %s", self.config.bundle.path, err)
                return EXIT_FAILURE
            except (SourceError, OSError) as err:
                logger.error("cannot start: %s", err)
                return EXIT_FAILURE
            except ConfigError as err:
                logger.error("cannot start: %s%s", err, "".join(f"\n  {p}" for p in err.problems))
                return EXIT_CONFIG
            self.wait()
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        failure = self.pipeline.failure if self.pipeline is not None else None
        return EXIT_FAILURE if failure is not None else EXIT_OK

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self._signals:
                # Someone wants out now. Safe for the durable state: the ledger, the JSONL results and the
                # MQTT outbox are written append- or commit-only and recover from a cut like a SIGKILL's.
                logger.warning("received %s again while stopping; exiting at once (exit %d)", name, 128 + signum)
                for handler in logging.getLogger().handlers:
                    handler.flush()
                os._exit(128 + signum)
            self._signals += 1
            logger.info("received %s; stopping (a second signal exits at once)", name)
            self.stop_event.set()

        return {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    # -- what other parts use --------------------------------------------------------------------

    def swap_engine(self, new_engine: Engine, timeout: float = 30.0) -> None:
        """Serve `new_engine` from the next frame on; close the old one after the last frame it inspects.

        The new engine must be fully loaded and verified: no frame ever meets a half-loaded one. On a
        timeout (a frame stuck in the old engine) the old engine stays and TimeoutError is raised.
        """
        with self._lock:
            old, pipeline = self.engine, self.pipeline
        old_version = old.manifest.version if old is not None else None
        new_version = new_engine.manifest.version
        self.events.publish(
            "bundle_swapping", f"bundle {old_version} -> {new_version}", old_version=old_version, version=new_version
        )
        if pipeline is not None:
            # Outside the lock: status() must stay answerable while the inference thread finishes a frame.
            try:
                old = pipeline.swap_inspector(new_engine, timeout)  # type: ignore[assignment]
            except Exception as err:
                self.events.publish(
                    "bundle_swap_failed",
                    f"bundle swap to {new_version} failed, still serving {old_version}: {err}",
                    old_version=old_version,
                    version=new_version,
                )
                raise
        with self._lock:
            self.engine = new_engine
        if old is not None and old is not new_engine:
            old.close()
        logger.info("bundle swapped: %s -> %s", old_version, new_version)
        self.events.publish(
            "bundle_changed",
            f"bundle {old_version} -> {new_version}",
            old_version=old_version,
            version=new_version,
            bundle_id=new_engine.manifest.bundle_id,
        )

    def activate_bundle(self, *, bundle_id: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Serve a bundle the updates service keeps (rollback or forward), proven first; returns what changed.

        RuntimeError when remote updates are off; ValueError when no kept bundle matches or it is refused.
        """
        activator = self.bundle_activator
        if activator is None:
            raise RuntimeError("remote updates are off (no enabled updates: section): no kept bundles to activate")
        return activator(bundle_id=bundle_id, version=version)

    def pause(self) -> bool:
        """Pause inspection (a hot folder's files wait, a camera's frames are dropped as `paused`).
        False when already paused or not running."""
        pipeline = self.pipeline
        changed = pipeline is not None and pipeline.pause()
        if changed:
            self.events.publish("paused", f"station {self.config.station} paused")
        return changed

    def resume(self) -> bool:
        """Resume inspection; False when not paused."""
        pipeline = self.pipeline
        changed = pipeline is not None and pipeline.resume()
        if changed:
            self.events.publish("resumed", f"station {self.config.station} resumed")
        return changed

    def tag_next(self, part_id: str, view: int | None = None) -> None:
        """The next captured frame belongs to part `part_id`, view `view` (the PLC trigger input)."""
        if self.pipeline is None:
            raise RuntimeError("the pipeline is not running")
        self.pipeline.tag_next(part_id, view)
        self.events.publish("triggered", f"next frame: part {part_id} view {view}", part_id=part_id, view=view)

    def inspect_now(self, frame: Frame) -> None:
        """Inspect `frame` (a file the PLC names) now, besides the source's frames; RuntimeError if not running."""
        if self.pipeline is None:
            raise RuntimeError("the pipeline is not running")
        self.pipeline.inject(frame)
        self.events.publish(
            "inspect_requested",
            f"inspect {frame.meta.get('file', frame.frame_id)} now",
            file=frame.meta.get("file"),
            result_id=frame.result_id,
            part_id=frame.part_id,
            view=frame.view,
        )

    def status(self) -> AgentStatus:
        """One consistent snapshot of state, bundle, providers, counters and progress."""
        with self._lock:
            engine, pipeline, source = self.engine, self.pipeline, self.source
            state, failure = self._state, self._failure
            started = list(self.services)
        services = [s.name for s in started]
        counters = pipeline.stats() if pipeline is not None else {}
        age = time.monotonic() - pipeline.last_progress() if pipeline is not None else 0.0
        return AgentStatus(
            state=state,
            station=self.config.station,
            bundle_id=engine.manifest.bundle_id if engine is not None else None,
            bundle_version=engine.manifest.version if engine is not None else None,
            providers=list(engine.providers_in_use) if engine is not None else [],
            counters=counters,
            last_progress_age_s=age,
            started_at=self._started_at,
            services=services,
            failure=failure,
            paused=pipeline.paused if pipeline is not None else False,
            source_problem=source.problem() if source is not None else None,
            queue_depths=_queue_depths(started),
            service_counters=_service_counters(started),
        )

    def _set_state(self, state: AgentState) -> None:
        with self._lock:
            self._state = state


def _queue_depths(services: Sequence[Service]) -> dict[str, int]:
    """The queues services report (`queue_depths()`, optional); one that fails is left out, and logged."""
    depths: dict[str, int] = {}
    for service in services:
        report = getattr(service, "queue_depths", None)
        if report is None:
            continue
        try:
            depths.update(report())
        except Exception:
            logger.exception("service %s could not report its queues", service.name)
    return depths


def _service_counters(services: Sequence[Service]) -> dict[str, dict[str, int]]:
    """Counters services report (`counters()`, optional: uploads done, evicted, updates rejected...)."""
    found: dict[str, dict[str, int]] = {}
    for service in services:
        report = getattr(service, "counters", None)
        if report is None or not callable(report):
            continue
        try:
            found[service.name] = {str(k): int(v) for k, v in report().items()}
        except Exception:
            logger.exception("service %s could not report its counters", service.name)
    return found
