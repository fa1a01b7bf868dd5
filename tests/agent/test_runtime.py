"""The Agent runtime: start order, reverse stop, engine swap between two frames, failed starts, signals."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lineside.agent.config import AgentConfig, parse_config
from lineside.agent.errors import EXIT_OK
from lineside.agent.events import Event
from lineside.agent.runtime import Agent, AgentState


def lineside_threads() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("lineside-") and t.is_alive())


@pytest.fixture
def images(tmp_path: Path, put_png: Callable[..., Path]) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        put_png(folder / f"img{i}.png", value=20 * i + 10)
    return folder


def replay_config(images: Path, **source: Any) -> AgentConfig:
    return parse_config(
        {
            "station": "cell-1",
            "bundle": {"path": str(images)},  # not read: the tests give their own engine
            "source": {"kind": "replay", "path": str(images), **source},
            "sinks": [],
            "status_log": {"interval_s": 0},
        }
    )


class RecordingService:
    """A service that records start and close into a shared log; `fail` makes start raise."""

    def __init__(self, name: str, log: list[str], *, fail: bool = False) -> None:
        self.name = name
        self.log = log
        self.fail = fail

    def start(self, stop: threading.Event) -> None:
        if self.fail:
            raise RuntimeError(f"{self.name} cannot start (simulated)")
        self.log.append(f"start {self.name}")

    def close(self) -> None:
        self.log.append(f"close {self.name}")


def test_services_start_after_the_pipeline_and_stop_in_reverse_before_it(
    images: Path, make_inspector: Callable, make_sink: Callable
) -> None:
    # given an agent whose engine, sink and services write into one log
    log: list[str] = []
    engine = make_inspector()
    sink = make_sink("results")
    engine_close, sink_close = engine.close, sink.close
    engine.close = lambda: (log.append("close engine"), engine_close())  # type: ignore[method-assign]
    sink.close = lambda: (log.append("close sink"), sink_close())  # type: ignore[method-assign]
    services = [RecordingService("first", log), RecordingService("second", log)]
    agent = Agent(
        replay_config(images, loop=True, rate_hz=20),
        engine_loader=lambda c: engine,
        sinks=[sink],
        services=services,
    )

    # when
    agent.start()
    running = agent.status()
    agent.stop()

    # then: started in order, stopped in reverse: services, then the pipeline (its sink), then the engine
    assert running.state == AgentState.RUNNING
    assert running.services == ["first", "second"]
    assert log == ["start first", "start second", "close second", "close first", "close sink", "close engine"]
    assert agent.status().state == AgentState.STOPPED
    assert lineside_threads() == []


def test_a_failing_service_start_leaves_nothing_running(
    images: Path, make_inspector: Callable, make_sink: Callable
) -> None:
    # given a second service that cannot start
    log: list[str] = []
    engine = make_inspector()
    sink = make_sink("results")
    events: list[Event] = []
    agent = Agent(
        replay_config(images, loop=True, rate_hz=20),
        engine_loader=lambda c: engine,
        sinks=[sink],
        services=[RecordingService("first", log), RecordingService("broken", log, fail=True)],
    )
    agent.events.subscribe(events.append)

    # when
    with pytest.raises(RuntimeError, match="broken cannot start"):
        agent.start()

    # then: the first service was closed, the pipeline's threads are gone, sink and engine closed
    assert log == ["start first", "close first"]
    assert lineside_threads() == []
    assert sink.closed and engine.closed
    assert agent.status().state == AgentState.FAILED
    assert "broken cannot start" in (agent.status().failure or "")
    assert events[0].kind == "service_failed"
    # frames queued when the start failed were released, each reported
    assert all(e.kind == "frame_dropped" and e.data["reason"] == "shutdown" for e in events[1:])


def test_swap_between_two_frames_while_frames_flow(images: Path, make_inspector: Callable, make_sink: Callable) -> None:
    # given two engines of different bundle versions, frames flowing at full speed
    old = make_inspector(delay=0.01)
    new = make_inspector(delay=0.01)
    new.manifest = type(old.manifest)(bundle_id="bundle-2", version="2026.02.02-1")
    frames = 120
    sink = make_sink("results")
    events: list[Event] = []
    agent = Agent(
        replay_config(images, loop=True, max_frames=frames), engine_loader=lambda c: old, sinks=[sink], services=[]
    )
    agent.events.subscribe(events.append)
    agent.start()
    try:
        deadline = time.monotonic() + 20
        while len(sink.results) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)

        # when the new engine is swapped in mid-stream
        agent.swap_engine(new)
        calls_of_old_at_swap = len(old.calls)
        closed_at_swap = old.closed
        agent.wait()
    finally:
        agent.stop()

    # then every frame was inspected once, by exactly one engine
    assert len(sink.results) == frames
    assert len({r.result_id for r in sink.results}) == frames
    assert len(old.calls) + len(new.calls) == frames
    assert 20 <= len(old.calls) < frames and len(new.calls) > 0
    # the old engine saw no frame after the swap returned, and was closed right then
    assert len(old.calls) == calls_of_old_at_swap and closed_at_swap
    # results switch bundle version exactly once, in frame order
    versions = [r.bundle_version for r in sink.results]
    switches = sum(1 for a, b in itertools.pairwise(versions) if a != b)
    assert switches == 1 and versions[0] == "2026.01.01-1" and versions[-1] == "2026.02.02-1"
    assert [e.data["version"] for e in events if e.kind == "bundle_changed"] == ["2026.02.02-1"]
    assert agent.status().bundle_version == "2026.02.02-1"


def test_swap_while_idle_takes_effect_without_a_frame(images: Path, make_inspector: Callable) -> None:
    # given an agent whose folder source has nothing to deliver
    hot = images / "hot"
    hot.mkdir()
    config = parse_config(
        {
            "station": "cell-1",
            "bundle": {"path": str(images)},
            "source": {"kind": "folder", "path": str(hot), "poll_interval": 0.05},
            "sinks": [],
        }
    )
    old, new = make_inspector(), make_inspector()
    agent = Agent(config, engine_loader=lambda c: old, services=[])
    agent.start()
    try:
        # when
        agent.swap_engine(new, timeout=5)
    finally:
        agent.stop()

    # then the old engine was handed back and closed without any frame
    assert old.closed and not old.calls
    assert agent.engine is new


def test_status_snapshot_and_events_report_errors(images: Path, make_inspector: Callable, make_sink: Callable) -> None:
    # given one undecodable image among the replayed ones
    (images / "img9.png").write_bytes(b"not an image")
    events: list[Event] = []
    agent = Agent(replay_config(images), engine_loader=lambda c: make_inspector(), sinks=[make_sink()], services=[])
    agent.events.subscribe(events.append)

    # when the finite source is served to the end
    agent.start()
    agent.wait()
    status = agent.status()
    agent.stop()

    # then
    assert status.station == "cell-1"
    assert status.bundle_version == "2026.01.01-1"
    assert status.providers == ["CPUExecutionProvider"]
    assert status.counters["frames_in"] == 7 and status.counters["errors"] == 1
    assert status.last_progress_age_s < 5
    errors = [e for e in events if e.kind == "frame_error"]
    assert len(errors) == 1 and errors[0].data["code"] == "decode_failed"
    assert [e.kind for e in events if e.kind in ("started", "stopping")] == ["started", "stopping"]


SIGTERM_WHILE_LOADING = """
import os, signal, sys, time
from lineside.agent.config import parse_config
from lineside.agent.runtime import Agent

class Engine:
    closed = False
    def close(self):
        Engine.closed = True

def load(config):
    os.kill(os.getpid(), signal.SIGTERM)  # systemd stops the unit while the bundle loads
    time.sleep(0.2)  # the Python handler runs here, if there is one
    return Engine()

config = parse_config({"station": "s", "bundle": {"path": sys.argv[1]},
                       "source": {"kind": "replay", "path": sys.argv[1], "loop": True}, "sinks": []})
agent = Agent(config, engine_loader=load, services=[])
code = agent.run()
print("exit", code, "pipeline", agent.pipeline, "engine closed", Engine.closed, flush=True)
sys.exit(code)
"""


def test_sigterm_while_the_bundle_loads_stops_cleanly(images: Path) -> None:
    # given a daemon process that receives SIGTERM while its engine loads

    # when
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_WHILE_LOADING, str(images)], capture_output=True, text=True, timeout=60
    )

    # then it exits 0 (not 143, killed by the signal), started nothing, and closed the engine
    assert proc.returncode == EXIT_OK, proc.stderr[-2000:]
    assert "exit 0 pipeline None engine closed True" in proc.stdout


def test_results_of_two_stations_never_share_an_id(images: Path, make_inspector: Callable, make_sink: Callable) -> None:
    # given the same images served by two stations with the default source name
    ids = []
    for station in ("cell-1", "cell-2"):
        sink = make_sink()
        config = replay_config(images).model_copy(update={"station": station})
        agent = Agent(config, engine_loader=lambda c: make_inspector(), sinks=[sink], services=[])
        agent.start()
        agent.wait()
        agent.stop()
        ids.append({r.result_id for r in sink.results})

    # then each station's ids are stable per frame but distinct from the other's
    assert len(ids[0]) == len(ids[1]) == 6
    assert not ids[0] & ids[1]
