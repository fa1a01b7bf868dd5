"""The frame pipeline: capture thread -> bounded queue -> inference thread -> results queue -> dispatch.

Threads, not processes: ONNX Runtime releases the GIL and a station has one X-ray source. Each
stage talks to the next through a queue only, so a stage could move to a process later.

- Capture pulls `source.frames()` into a bounded frame queue. When it is full the policy decides:
  `drop_oldest` (live cameras: the newest frame matters) drops and counts the oldest queued frame;
  `block` (hot folders, replay: every file must be inspected) makes capture wait.
- Inference owns the inspector and turns every frame into exactly one InspectionResult. A frame that
  failed to decode, or whose prediction raised, becomes an error result; the loop never dies of it.
- Dispatch hands each result to every sink. A raising sink is logged and counted, the others still
  get the result. The source is then acknowledged: `ack(ok)` when every durable sink stored the result
  (ok = the result has no error), `release()` when a durable sink failed, so the source may offer the
  frame again later (same result id, de-duplicated downstream) instead of recording it as done.
- `swap_inspector(new)` hands the inference thread a new engine; it takes it between two frames, so
  each frame is inspected by exactly one engine, and the caller may close the old one afterwards.
- Errors, drops and sink failures are published to the event hub when one is given.
- `pause()` / `resume()`: while paused, capture holds the frame it has (block policy: a hot folder's file
  waits, nothing is dropped) or drops it counted as `paused` (drop_oldest: a live camera). `tag_next(part,
  view)` sets the part id and view of the next captured frame (the PLC's trigger input). `inject(frame)`
  queues a frame that does not come from the source (a file the PLC names: inspect it now); it is
  inspected and dispatched like any other, paused or not, but never acknowledged to the source.
- One stop Event; every wait has a timeout. `stop()` joins capture, inference, dispatch in that order
  (reverse of start), releases frames still queued, then closes the source and the sinks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np

from lineside.agent.config import QueueConfig
from lineside.agent.events import EventHub
from lineside.agent.inference.types import Prediction
from lineside.agent.plugins import QueuePolicy
from lineside.agent.results import INJECTED_SOURCE, Frame, FrameError, InspectionResult, ResultBox, ResultError
from lineside.agent.sinks.base import Sink
from lineside.agent.sources.base import FrameSource

logger = logging.getLogger(__name__)

LATENCY_WINDOW = 1024  # recent samples per stage kept for the percentile summary
_LOG_EVERY_S = 60.0


class ManifestLike(Protocol):
    """What the pipeline reads of a bundle manifest."""

    @property
    def bundle_id(self) -> str: ...

    @property
    def version(self) -> str: ...


class Inspector(Protocol):
    """What the pipeline needs of an inference engine (agent.inference.engine.InferenceEngine)."""

    @property
    def manifest(self) -> ManifestLike: ...

    @property
    def providers_in_use(self) -> list[str]: ...

    def predict(self, image: np.ndarray, bits_stored: int | None = None) -> Prediction: ...


class Throttle:
    """Lets a repeated log message through at most once per `interval` seconds, counting the rest."""

    def __init__(self, interval: float = _LOG_EVERY_S) -> None:
        self.interval = interval
        self._next = 0.0
        self.suppressed = 0

    def ready(self) -> bool:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            return True
        self.suppressed += 1
        return False


def _base_fields(inspector: Inspector, frame: Frame) -> dict[str, Any]:
    return {
        "result_id": frame.result_id,
        "frame_id": frame.frame_id,
        "source": frame.source,
        "part_id": frame.part_id,
        "view": frame.view,
        "captured_at": frame.captured_wall,
        "bundle_id": inspector.manifest.bundle_id,
        "bundle_version": inspector.manifest.version,
        "providers": list(inspector.providers_in_use),
        "width": None if frame.image is None else int(frame.image.shape[1]),
        "height": None if frame.image is None else int(frame.image.shape[0]),
        "meta": dict(frame.meta),
    }


def inspect_frame(
    inspector: Inspector, frame: Frame, queue_ms: float | None = None, *, failure_log: Throttle | None = None
) -> InspectionResult:
    """Inspect one frame; never raises. Errors (decode, inference) become error results.

    `failure_log` rate-limits the warning logged for an engine failure (default: log every one).

    `latency_ms` holds decode, queue (when given), the engine's own stages, inference (the whole
    predict call) and total (capture to result).
    """
    latency: dict[str, float] = {"decode": frame.decode_ms}
    if queue_ms is not None:
        latency["queue"] = queue_ms
    fields = _base_fields(inspector, frame)
    error: ResultError | None = None
    prediction: Prediction | None = None
    if frame.error is not None:
        error = ResultError(code=frame.error.code, message=frame.error.message)
    elif frame.image is None:
        error = ResultError(code="no_image", message=f"frame {frame.frame_id} carries neither image nor error")
    else:
        start = time.perf_counter()
        try:
            prediction = inspector.predict(frame.image, frame.bits_stored)
            boxes = [
                ResultBox(x1=d.x1, y1=d.y1, x2=d.x2, y2=d.y2, score=d.score, source=d.source) for d in prediction.boxes
            ]
        except Exception as err:  # the daemon must outlive any single bad frame
            prediction = None
            error = ResultError(code="inference_failed", message=f"{type(err).__name__}: {err}")
            if failure_log is None or failure_log.ready():
                logger.warning(
                    "inference failed on frame %s (bundle %s; %d similar failures not logged)",
                    frame.frame_id,
                    fields["bundle_version"],
                    0 if failure_log is None else failure_log.suppressed,
                    exc_info=True,
                )
        latency["inference"] = (time.perf_counter() - start) * 1000.0
        if prediction is not None:
            latency = {**prediction.timings_ms, **latency}
    latency["total"] = (time.monotonic() - frame.captured_mono) * 1000.0
    if prediction is None:
        return InspectionResult(
            **fields,
            inspected_at=datetime.now(UTC),
            latency_ms=latency,
            is_defective=None,
            score=None,
            error=error,
        )
    return InspectionResult(
        **fields,
        inspected_at=datetime.now(UTC),
        latency_ms=latency,
        is_defective=bool(prediction.is_defective),
        score=float(prediction.score),
        model_scores={k: float(v) for k, v in prediction.model_scores.items()},
        boxes=boxes,
    )


class _Window:
    """Recent latency samples of one stage."""

    def __init__(self) -> None:
        self.count = 0
        self.samples: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def add(self, value: float) -> None:
        self.count += 1
        self.samples.append(value)

    def summary(self) -> dict[str, float]:
        values = np.fromiter(self.samples, dtype=np.float64)
        if values.size == 0:
            return {"count": float(self.count)}
        p50, p95 = np.percentile(values, (50, 95))
        return {
            "count": float(self.count),
            "mean": round(float(values.mean()), 3),
            "p50": round(float(p50), 3),
            "p95": round(float(p95), 3),
            "max": round(float(values.max()), 3),
        }


_END = object()  # capture -> inference: the source is exhausted


class Pipeline:
    """Runs a source through an inspector into sinks on three threads; see the module docstring.

    The pipeline owns the source and the sinks (it starts and closes them), not the inspector.
    """

    def __init__(
        self,
        source: FrameSource,
        inspector: Inspector,
        sinks: Sequence[Sink],
        queue_config: QueueConfig | None = None,
        *,
        policy: QueuePolicy | None = None,
        results_capacity: int = 64,
        join_timeout: float = 5.0,
        poll_s: float = 0.1,
        stop_event: threading.Event | None = None,
        events: EventHub | None = None,
    ) -> None:
        queue_config = queue_config or QueueConfig()
        self.source = source
        self.inspector = inspector
        self.sinks = list(sinks)
        self.policy: QueuePolicy = policy or queue_config.policy or source.default_queue_policy
        self.capacity = queue_config.capacity
        self.join_timeout = join_timeout
        self.poll_s = poll_s
        self.stop_event = stop_event or threading.Event()
        self.events = events
        self.failure: BaseException | None = None
        self._swap: tuple[Inspector, threading.Event] | None = None
        self._frames: queue.Queue[Any] = queue.Queue(maxsize=self.capacity)
        # Bounded too: a hung sink eventually backs up into the frame queue, where the policy applies.
        self._results: queue.Queue[tuple[InspectionResult, Frame]] = queue.Queue(maxsize=results_capacity)
        self._inference_done = threading.Event()
        self._finished = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {"frames_in": 0, "results_out": 0, "errors": 0}
        self._errors_by_code: dict[str, int] = {}
        self._drops: dict[str, int] = {}
        self._sink_failures: dict[str, int] = {sink.name: 0 for sink in self.sinks}
        self._acks: dict[str, int] = {"ok": 0, "failed": 0, "released": 0, "ack_errors": 0}
        self._latency: dict[str, _Window] = {}
        self._capture_blocked_s = 0.0
        self._sink_throttles = {sink.name: Throttle() for sink in self.sinks}
        self._predict_failures = Throttle()
        self._heartbeat = time.monotonic()
        self._capture_beat = time.monotonic()
        self._stopped = False
        self._paused = threading.Event()
        self._next_tag: tuple[str, int | None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Open the source and start dispatch, inference and capture. SourceError if the source fails."""
        self.source.start(self.stop_event)
        for name, target in (
            ("dispatch", self._dispatch),
            ("inference", self._infer),
            ("capture", self._capture),
        ):
            thread = threading.Thread(target=target, name=f"lineside-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        logger.info(
            "pipeline started: source %s (%s), queue %d %s, bundle %s, providers %s, sinks %s",
            self.source.name,
            self.source.kind,
            self.capacity,
            self.policy,
            self.inspector.manifest.version,
            ",".join(self.inspector.providers_in_use),
            ",".join(s.name for s in self.sinks) or "none",
        )

    @property
    def finished(self) -> bool:
        """True once the source is exhausted (or failed) and every result has been dispatched."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until finished or stopped; True when finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished.is_set():
            if self.stop_event.is_set():
                return False
            remaining = self.poll_s if deadline is None else min(self.poll_s, deadline - time.monotonic())
            if remaining <= 0:
                return False
            self._finished.wait(remaining)
        return True

    def stop(self) -> None:
        """Set the stop event, join threads in reverse start order, release leftovers, close everything."""
        if self._stopped:
            return
        self._stopped = True
        self.stop_event.set()
        for thread in reversed(self._threads):
            thread.join(self.join_timeout)
            if thread.is_alive():
                logger.error("thread %s did not stop within %.1f s", thread.name, self.join_timeout)
            if thread.name == "lineside-inference":
                self._release_queued()
        try:
            self.source.close()
        except Exception:
            logger.exception("closing source %s failed", self.source.name)
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                logger.exception("closing sink %s failed", sink.name)

    def pause(self) -> bool:
        """Stop taking frames in (see the module docstring); False when already paused."""
        was = self._paused.is_set()
        self._paused.set()
        return not was

    def resume(self) -> bool:
        """Take frames in again; False when not paused."""
        was = self._paused.is_set()
        self._paused.clear()
        return was

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def tag_next(self, part_id: str, view: int | None) -> None:
        """Give the next captured frame this part id and view (replacing a tag not yet used)."""
        with self._lock:
            self._next_tag = (part_id, view)

    def inject(self, frame: Frame, timeout: float = 2.0) -> None:
        """Queue `frame` (source `INJECTED_SOURCE`) for inspection now; RuntimeError when it cannot be."""
        if frame.source != INJECTED_SOURCE:
            raise ValueError(f"injected frames have source {INJECTED_SOURCE!r}, not {frame.source!r}")
        if self.stop_event.is_set() or self._inference_done.is_set() or not self._thread_alive("lineside-inference"):
            raise RuntimeError("the pipeline is not inspecting frames")
        try:
            self._frames.put((frame, time.monotonic()), timeout=timeout)
        except queue.Full:
            raise RuntimeError(f"the frame queue stayed full for {timeout:g} s; try again") from None
        self._bump("frames_in")

    def pending_tag(self) -> tuple[str, int | None] | None:
        with self._lock:
            return self._next_tag

    def _hold_while_paused(self, frame: Frame) -> bool:
        # Capture thread. True: go on with the frame; False: it was released (dropped or shutdown).
        if not self._paused.is_set():
            return True
        if self.policy != "block":
            self._release(frame, "paused")
            return False
        while self._paused.is_set():
            self._capture_beat = time.monotonic()
            if self.stop_event.wait(self.poll_s):
                return True  # the caller's stop check releases it
        return True

    def _apply_tag(self, frame: Frame) -> Frame:
        with self._lock:
            tag, self._next_tag = self._next_tag, None
        if tag is None:
            return frame
        part_id, view = tag
        return replace(frame, part_id=part_id, view=view, meta={**frame.meta, "tagged_by": "trigger"})

    def last_progress(self) -> float:
        """Monotonic time both ends last showed life, for a watchdog: the inference loop (it goes round while
        idle too) and, while capture runs, the source's own loop or capture waiting on a full queue or a
        pause. A frame stuck in the engine or a read stuck inside the source stops it; a quiet line does not.
        """
        if not self._thread_alive("lineside-capture"):
            return self._heartbeat  # a finished source (end of a replay) is not a stuck one
        return min(self._heartbeat, max(self.source.heartbeat, self._capture_beat))

    def swap_inspector(self, new: Inspector, timeout: float = 30.0) -> Inspector:
        """Make `new` inspect every later frame; returns the old inspector once no frame uses it any more.

        The inference thread takes the new inspector between two frames (within `poll_s` when idle).
        Raises TimeoutError, with the old inspector still in place, when it does not within `timeout`
        (a frame stuck in the engine); RuntimeError when another swap is pending.
        """
        handover = threading.Event()
        with self._lock:
            if self._swap is not None:
                raise RuntimeError("another engine swap is pending")
            if not self._thread_alive("lineside-inference"):
                old, self.inspector = self.inspector, new  # nothing inspects: swap in place
                return old
            self._swap = (new, handover)
            old = self.inspector
        if handover.wait(timeout):
            return old
        with self._lock:
            if handover.is_set():  # taken just now
                return old
            self._swap = None
        raise TimeoutError(f"the inference thread did not take the new engine within {timeout:.0f} s")

    def _take_swap(self) -> None:
        # Inference thread only, between frames.
        with self._lock:
            if self._swap is None:
                return
            new, handover = self._swap
            self._swap = None
            self.inspector = new
            handover.set()

    # -- threads ---------------------------------------------------------------------------------

    def _capture(self) -> None:
        frames = self.source.frames()
        try:
            for frame in frames:
                self._bump("frames_in")
                if not self._hold_while_paused(frame):
                    continue
                if self.stop_event.is_set():
                    self._release(frame, "shutdown")
                    break
                frame = self._apply_tag(frame)
                if not self._enqueue(frame):
                    self._release(frame, "shutdown")
                    break
                if self.stop_event.is_set():
                    break
        except Exception as err:
            # A source that cannot go on ends the pipeline; systemd restarts the service.
            logger.exception("source %s failed; stopping the pipeline", self.source.name)
            self.failure = err
            self.stop_event.set()
        finally:
            frames.close()
            self._put_end()

    def _enqueue(self, frame: Frame) -> bool:
        item = (frame, time.monotonic())
        if self.policy == "block":
            start = time.monotonic()
            try:
                while not self.stop_event.is_set():
                    self._capture_beat = time.monotonic()  # waiting on the pipeline is not a stuck source
                    try:
                        self._frames.put(item, timeout=self.poll_s)
                        return True
                    except queue.Full:
                        continue
                return False
            finally:
                with self._lock:
                    self._capture_blocked_s += time.monotonic() - start
        while True:
            try:
                self._frames.put_nowait(item)
                return True
            except queue.Full:
                try:
                    old_frame, _ = self._frames.get_nowait()
                except queue.Empty:
                    continue  # inference took one meanwhile
                self._release(old_frame, "queue_full")

    def _put_end(self) -> None:
        while not self.stop_event.is_set():
            try:
                self._frames.put(_END, timeout=self.poll_s)
                return
            except queue.Full:
                continue

    def _infer(self) -> None:
        try:
            while not self.stop_event.is_set():
                self._heartbeat = time.monotonic()
                self._take_swap()
                try:
                    item = self._frames.get(timeout=self.poll_s)
                except queue.Empty:
                    continue
                if item is _END:
                    break
                frame, enqueued = item
                result = inspect_frame(
                    self.inspector,
                    frame,
                    (time.monotonic() - enqueued) * 1000.0,
                    failure_log=self._predict_failures,
                )
                self._record(result)
                self._put_result(result, frame)
        finally:
            self._inference_done.set()

    def _put_result(self, result: InspectionResult, frame: Frame) -> None:
        # Results already made are worth delivering even while stopping, as long as dispatch runs.
        while True:
            try:
                self._results.put((result, frame), timeout=self.poll_s)
                return
            except queue.Full:
                if self.stop_event.is_set() and not self._thread_alive("lineside-dispatch"):
                    self._release(frame, "shutdown")
                    return

    def _dispatch(self) -> None:
        try:
            while True:
                try:
                    result, frame = self._results.get(timeout=self.poll_s)
                except queue.Empty:
                    if self._inference_done.is_set() and self._results.empty():
                        return
                    continue
                self._deliver(result, frame)
        finally:
            self._finished.set()

    def _deliver(self, result: InspectionResult, frame: Frame) -> None:
        durable_ok = True
        start = time.perf_counter()
        for sink in self.sinks:
            try:
                sink.publish(result, frame)
            except Exception:
                durable_ok = durable_ok and not sink.durable
                throttle = self._sink_throttles[sink.name]
                with self._lock:
                    self._sink_failures[sink.name] += 1
                self._publish(
                    "sink_failed",
                    f"sink {sink.name} failed on frame {frame.frame_id}",
                    sink=sink.name,
                    result_id=result.result_id,
                )
                if throttle.ready():
                    logger.warning(
                        "sink %s failed on frame %s (%d similar failures not logged)",
                        sink.name,
                        frame.frame_id,
                        throttle.suppressed,
                        exc_info=True,
                    )
        with self._lock:
            self._counts["results_out"] += 1
            self._window("publish").add((time.perf_counter() - start) * 1000.0)
        if not durable_ok:
            self._release(frame, "sink_failed")
            return
        if frame.source == INJECTED_SOURCE:
            return  # not the source's frame: nothing to acknowledge
        ok = result.error is None
        reason = None if result.error is None else FrameError(result.error.code, result.error.message)
        try:
            self.source.ack(frame, ok, reason)
            self._bump_ack("ok" if ok else "failed")
        except Exception:
            self._bump_ack("ack_errors")
            logger.exception("acknowledging frame %s to source %s failed", frame.frame_id, self.source.name)

    # -- bookkeeping -----------------------------------------------------------------------------

    def _thread_alive(self, name: str) -> bool:
        return any(t.name == name and t.is_alive() for t in self._threads)

    def _release_queued(self) -> None:
        while True:
            try:
                item = self._frames.get_nowait()
            except queue.Empty:
                return
            if item is not _END:
                self._release(item[0], "shutdown")

    def _release(self, frame: Frame, reason: str) -> None:
        with self._lock:
            if reason != "sink_failed":
                self._drops[reason] = self._drops.get(reason, 0) + 1
            self._acks["released"] += 1
        if reason != "sink_failed":
            self._publish(
                "frame_dropped", f"frame {frame.frame_id} dropped ({reason})", reason=reason, frame_id=frame.frame_id
            )
        if frame.source == INJECTED_SOURCE:
            return
        try:
            self.source.release(frame)
        except Exception:
            self._bump_ack("ack_errors")
            logger.exception("releasing frame %s to source %s failed", frame.frame_id, self.source.name)

    def _publish(self, kind: str, message: str, **data: Any) -> None:
        if self.events is not None:
            self.events.publish(kind, message, **data)

    def _bump(self, key: str) -> None:
        with self._lock:
            self._counts[key] += 1

    def _bump_ack(self, key: str) -> None:
        with self._lock:
            self._acks[key] += 1

    def _window(self, stage: str) -> _Window:
        window = self._latency.get(stage)
        if window is None:
            window = self._latency[stage] = _Window()
        return window

    def _record(self, result: InspectionResult) -> None:
        with self._lock:
            if result.error is not None:
                self._counts["errors"] += 1
                code = result.error.code
                self._errors_by_code[code] = self._errors_by_code.get(code, 0) + 1
            for stage, value in result.latency_ms.items():
                self._window(stage).add(value)
        if result.error is not None:
            self._publish(
                "frame_error",
                f"frame {result.frame_id}: {result.error.message}",
                code=result.error.code,
                result_id=result.result_id,
                frame_id=result.frame_id,
            )

    def stats(self) -> dict[str, Any]:
        """Counters and a per-stage latency summary (ms: count, mean, p50, p95, max of recent frames)."""
        with self._lock:
            return {
                **self._counts,
                "errors_by_code": dict(self._errors_by_code),
                "drops_by_reason": dict(self._drops),
                "sink_failures": dict(self._sink_failures),
                "acks": dict(self._acks),
                "queue_depth": self._frames.qsize(),
                "queue_policy": self.policy,
                "capture_blocked_s": round(self._capture_blocked_s, 3),
                "latency_ms": {stage: w.summary() for stage, w in self._latency.items()},
                "source": self.source.snapshot(),
            }
