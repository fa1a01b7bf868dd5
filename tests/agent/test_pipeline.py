"""Pipeline mechanics with real sources and sinks and a recording stand-in for the engine."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from lineside.agent.config import QueueConfig
from lineside.agent.pipeline import Pipeline, inspect_frame
from lineside.agent.results import Frame
from lineside.agent.sinks import JsonlSink
from lineside.agent.sources import FolderSource, FolderSourceConfig, ReplaySource, ReplaySourceConfig
from lineside.agent.sources.base import FrameSource, frame_from_bytes


@pytest.fixture
def images(tmp_path: Path, put_png: Callable[..., Path]) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        put_png(folder / f"img{i}.png", value=20 * i + 10)
    return folder


def replay(folder: Path, **overrides: object) -> ReplaySource:
    settings: dict[str, object] = {"kind": "replay", "path": folder}
    settings.update(overrides)
    return ReplaySource(ReplaySourceConfig.model_validate(settings))


def run_to_end(pipeline: Pipeline, timeout: float = 20.0) -> dict:
    pipeline.start()
    try:
        assert pipeline.wait(timeout), "pipeline did not finish in time"
    finally:
        pipeline.stop()
    return pipeline.stats()


def test_every_frame_gets_exactly_one_result(images: Path, make_inspector: Callable, make_sink: Callable) -> None:
    # given: 3 passes over 5 images through a queue of 2 that blocks when full
    inspector = make_inspector()
    sink = make_sink()
    pipeline = Pipeline(
        replay(images, loop=True, max_frames=15), inspector, [sink], QueueConfig(capacity=2, policy="block")
    )

    # when
    stats = run_to_end(pipeline)

    # then
    ids = [r.result_id for r in sink.results]
    assert len(ids) == len(set(ids)) == 15
    assert len(inspector.calls) == 15
    assert stats["frames_in"] == stats["results_out"] == 15
    assert stats["drops_by_reason"] == {}
    assert stats["acks"]["ok"] == 15
    assert sink.closed
    result = sink.results[0]
    assert result.bundle_version == "2026.01.01-1"
    assert result.providers == ["CPUExecutionProvider"]
    assert {"decode", "queue", "preprocess", "ssd", "inference", "total"} <= set(result.latency_ms)
    assert (result.width, result.height) == (40, 32)
    assert result.boxes[0].source == "ssd"
    assert stats["latency_ms"]["total"]["count"] == 15
    assert stats["latency_ms"]["total"]["p95"] >= stats["latency_ms"]["total"]["p50"]


def test_drop_oldest_counts_every_drop_when_inference_is_slow(
    images: Path, make_inspector: Callable, make_sink: Callable
) -> None:
    # given: frames arrive much faster than a slow inspector handles them
    inspector = make_inspector(delay=0.05)
    sink = make_sink()
    pipeline = Pipeline(
        replay(images, loop=True, max_frames=40),
        inspector,
        [sink],
        QueueConfig(capacity=1, policy="drop_oldest"),
    )

    # when
    stats = run_to_end(pipeline)

    # then: no frame is lost silently
    drops = stats["drops_by_reason"].get("queue_full", 0)
    assert drops > 0
    assert stats["frames_in"] == 40
    assert len(sink.results) + drops == 40
    assert stats["acks"]["released"] == drops


def test_a_raising_inspector_gives_error_results_and_the_pipeline_goes_on(
    images: Path, make_inspector: Callable, make_sink: Callable
) -> None:
    # given: every second prediction raises
    inspector = make_inspector(fail_every=2)
    sink = make_sink()
    pipeline = Pipeline(replay(images, loop=True, max_frames=10), inspector, [sink])

    # when
    stats = run_to_end(pipeline)

    # then
    errors = [r for r in sink.results if r.error is not None]
    assert len(sink.results) == 10
    assert len(errors) == 5
    assert all(r.error.code == "inference_failed" and "simulated" in r.error.message for r in errors)
    assert all(r.is_defective is None and r.score is None for r in errors)
    assert stats["errors"] == 5
    assert stats["errors_by_code"] == {"inference_failed": 5}
    assert stats["acks"] == {"ok": 5, "failed": 5, "released": 0, "ack_errors": 0}


def test_a_raising_sink_is_counted_and_the_other_sinks_still_get_every_result(
    images: Path, tmp_path: Path, make_inspector: Callable, make_sink: Callable
) -> None:
    # given: a broken non-durable sink before a real jsonl sink
    broken = make_sink("broken", fail=True)
    jsonl = JsonlSink(tmp_path / "results.jsonl")
    pipeline = Pipeline(replay(images), make_inspector(), [broken, jsonl])

    # when
    stats = run_to_end(pipeline)

    # then
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 5
    assert stats["sink_failures"] == {"broken": 5, jsonl.name: 0}
    assert stats["acks"]["ok"] == 5


def test_decode_failures_pass_through_as_error_results(
    tmp_path: Path, put_png: Callable[..., Path], make_inspector: Callable, make_sink: Callable
) -> None:
    # given
    folder = tmp_path / "mixed"
    folder.mkdir()
    put_png(folder / "good.png")
    (folder / "bad.png").write_bytes(b"garbage")
    inspector = make_inspector()
    sink = make_sink()

    # when
    run_to_end(Pipeline(replay(folder), inspector, [sink]))

    # then: the bad frame never reaches the inspector but still has a result
    by_frame = {r.frame_id: r for r in sink.results}
    assert by_frame["0:bad.png"].error is not None
    assert by_frame["0:bad.png"].error.code == "decode_failed"
    assert by_frame["0:bad.png"].is_defective is None
    assert by_frame["0:good.png"].error is None
    assert len(inspector.calls) == 1


def test_hot_folder_through_pipeline_moves_files_and_failed_durable_sink_holds_them_back(
    tmp_path: Path, put_png: Callable[..., Path], make_inspector: Callable, make_sink: Callable
) -> None:
    # given: one good and one broken image; first a durable sink that fails
    hot = tmp_path / "hot"
    hot.mkdir()
    put_png(hot / "ok.png")
    (hot / "broken.png").write_bytes(b"nope")
    config = FolderSourceConfig(kind="folder", path=hot, settle_seconds=0, poll_interval=0.02, retry_seconds=60)
    stop = threading.Event()
    failing = make_sink("store", fail=True, durable=True)
    pipeline = Pipeline(FolderSource(config), make_inspector(), [failing], stop_event=stop)

    # when: the durable sink fails
    pipeline.start()
    try:
        for _ in range(100):
            if pipeline.stats()["acks"]["released"] == 2:
                break
            stop.wait(0.05)
    finally:
        pipeline.stop()

    # then: nothing is recorded as done; the files stay for a later attempt
    assert sorted(p.name for p in hot.iterdir() if p.is_file()) == ["broken.png", "ok.png"]
    assert pipeline.stats()["sink_failures"] == {"store": 2}

    # when: a restart with a working durable sink
    results = tmp_path / "results.jsonl"
    restarted = Pipeline(FolderSource(config), make_inspector(), [JsonlSink(results)])
    restarted.start()
    try:
        for _ in range(100):
            if restarted.stats()["acks"]["ok"] + restarted.stats()["acks"]["failed"] == 2:
                break
            restarted.stop_event.wait(0.05)
    finally:
        restarted.stop()

    # then
    assert sorted(p.name for p in (hot / "done").iterdir()) == ["ok.png"]
    assert sorted(p.name for p in (hot / "failed").iterdir()) == ["broken.png", "broken.png.error.json"]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert {row["frame_id"]: (row["error"] or {}).get("code") for row in rows} == {
        "ok.png": None,
        "broken.png": "decode_failed",
    }


def test_stop_is_prompt_while_the_source_waits_for_files(tmp_path: Path, make_inspector: Callable) -> None:
    # given: an empty hot folder
    hot = tmp_path / "hot"
    hot.mkdir()
    pipeline = Pipeline(
        FolderSource(FolderSourceConfig(kind="folder", path=hot, poll_interval=0.05)), make_inspector(), []
    )
    pipeline.start()

    # when
    pipeline.stop()

    # then
    assert not any(t.is_alive() for t in pipeline._threads)
    assert pipeline.stats()["frames_in"] == 0


def test_inspect_frame_never_raises(make_png: Callable[..., bytes], make_inspector: Callable) -> None:
    # given
    frame = frame_from_bytes(make_png(16, 16), name="x.png", source="cli", key="x", max_pixels=10**6)
    inspector = make_inspector(fail_every=1)

    # when
    result = inspect_frame(inspector, frame)

    # then
    assert result.error is not None and result.error.code == "inference_failed"
    assert result.result_id == frame.result_id
    assert isinstance(frame.image, np.ndarray)


class StuckSource(FrameSource):
    """A source whose read hangs (a dead share or grabber) until `unstick` is set."""

    config_class = ReplaySourceConfig

    def __init__(self, folder: Path) -> None:
        super().__init__(ReplaySourceConfig(kind="replay", path=folder))
        self.unstick = threading.Event()
        self.stuck = threading.Event()

    def frames(self) -> Iterator[Frame]:
        while not self._stop.is_set():
            self.beat()
            self.stuck.set()
            self.unstick.wait()  # the read that never returns, no beat meanwhile
            self.stuck.clear()
            if self.wait(0.05):
                return
        yield from ()  # a generator, as frames() must be


def _age(pipeline: Pipeline) -> float:
    return time.monotonic() - pipeline.last_progress()


def test_a_read_stuck_inside_the_source_stops_the_progress_an_idle_line_does_not(
    images: Path, tmp_path: Path, make_inspector: Callable
) -> None:
    # given a pipeline on a source that hangs in a read, and one on an empty hot folder
    stuck_source = StuckSource(images)
    stuck = Pipeline(stuck_source, make_inspector(), [], poll_s=0.02)
    hot = tmp_path / "hot"
    hot.mkdir()
    idle = Pipeline(
        FolderSource(FolderSourceConfig(kind="folder", path=hot, poll_interval=0.05)), make_inspector(), [], poll_s=0.02
    )
    stuck.start()
    idle.start()
    try:
        assert stuck_source.stuck.wait(5)

        # when a second passes
        time.sleep(1.0)

        # then the stuck capture shows, the idle line does not
        assert _age(stuck) >= 0.9
        assert _age(idle) < 0.5

        # and once the read returns, progress resumes
        stuck_source.unstick.set()
        deadline = time.monotonic() + 5
        while _age(stuck) > 0.5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _age(stuck) <= 0.5
    finally:
        stuck_source.unstick.set()
        stuck.stop()
        idle.stop()


def test_capture_waiting_on_a_full_queue_is_not_stuck(images: Path, make_inspector: Callable) -> None:
    # given slow inference and a queue of one, so capture waits on the pipeline (block policy)
    pipeline = Pipeline(
        replay(images, loop=True), make_inspector(delay=0.3), [], QueueConfig(capacity=1), policy="block", poll_s=0.02
    )
    pipeline.start()
    try:
        # when the queue stays full for a while
        time.sleep(1.0)

        # then the watchdog sees life at both ends
        assert _age(pipeline) < 0.5
    finally:
        pipeline.stop()
