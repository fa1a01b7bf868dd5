"""sd_notify against a real datagram socket bound by the test: READY after start, WATCHDOG from progress,
STATUS lines, RELOADING around a bundle swap, STOPPING."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lineside.agent.config import AgentConfig, parse_config
from lineside.agent.runtime import Agent, AgentState
from lineside.agent.services.notify import NotifyService, notify_address


class NotifySocket:
    """A bound AF_UNIX datagram socket playing systemd's part; collects every message."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(notify_address(address))
        self.sock.settimeout(0.05)
        self.messages: list[dict[str, str]] = []
        self.cursor = 0  # wait_for looks at messages from here on

    def drain(self) -> list[dict[str, str]]:
        """Every message that arrived so far (non-blocking beyond a short poll)."""
        got = []
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            got.append(dict(line.split("=", 1) for line in data.decode().split("\n") if line))
        self.messages.extend(got)
        return got

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20.0) -> dict[str, str]:
        """The next message (after the last one waited for) with `key` (= `value`)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.drain()
            while self.cursor < len(self.messages):
                message = self.messages[self.cursor]
                self.cursor += 1
                if key in message and (value is None or message[key] == value):
                    return message
        raise AssertionError(f"no {key}={value} within {timeout} s; got {self.messages[-5:]}")


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    # The abstract namespace ('@'), as systemd uses it: no path-length limit, nothing left on disk.
    address = f"@lineside-test-{uuid.uuid4().hex}"
    server = NotifySocket(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    yield server
    server.sock.close()


@pytest.fixture
def images(tmp_path: Path, put_png: Callable[..., Path]) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        put_png(folder / f"img{i}.png", value=20 * i + 10)
    return folder


def config(images: Path, **source: Any) -> AgentConfig:
    return parse_config(
        {
            "station": "cell-1",
            "bundle": {"path": str(images)},
            "source": {"kind": "replay", "path": str(images), "loop": True, **source},
            "sinks": [],
            "status_log": {"interval_s": 0},
            "notify": {"status_interval_s": 0.2},
            "health": {"port": 0},
        }
    )


def test_ready_only_once_the_agent_runs_then_status_and_stopping(
    notify_socket: NotifySocket, images: Path, make_inspector: Callable
) -> None:
    # given an engine whose loading the test holds up, and records whether systemd heard anything meanwhile
    release = threading.Event()
    heard_while_loading: list[dict[str, str]] = []

    def load(_config: AgentConfig) -> Any:
        release.wait(20)
        heard_while_loading.extend(notify_socket.drain())
        return make_inspector(delay=0.005)

    agent = Agent(config(images, rate_hz=50), engine_loader=load)  # the registered services, notify among them
    starter = threading.Thread(target=agent.start)
    starter.start()

    # when the engine finishes loading
    assert notify_socket.drain() == []
    release.set()
    starter.join(20)
    try:
        ready = notify_socket.wait_for("READY", "1")
        state_at_ready, services = agent.status().state, agent.status().services
        status = notify_socket.wait_for("STATUS")
        while "frames/s" not in status["STATUS"] or status["STATUS"].startswith("running: 0.0"):
            status = notify_socket.wait_for("STATUS")
    finally:
        agent.stop()
    stopping = notify_socket.wait_for("STOPPING", "1")

    # then READY came after the engine, pipeline and services were up, never before
    assert heard_while_loading == [] and state_at_ready == AgentState.RUNNING
    assert "bundle 2026.01.01-1" in ready["STATUS"]
    assert "notify" in services
    # STATUS carries the rate and the bundle version
    assert status["STATUS"].startswith("running: ") and "bundle 2026.01.01-1" in status["STATUS"]
    assert stopping["STATUS"] == "stopping"


def test_watchdog_pings_while_idle_stop_when_inference_hangs_and_resume(
    notify_socket: NotifySocket, images: Path, make_inspector: Callable
) -> None:
    # given an engine that hangs on the frame after `hang` is set, until `unhang` is set
    hang, unhang = threading.Event(), threading.Event()
    engine = make_inspector()
    predict = engine.predict

    def maybe_hang(*args: Any, **kwargs: Any) -> Any:
        if hang.is_set():
            unhang.wait(30)
        return predict(*args, **kwargs)

    engine.predict = maybe_hang  # type: ignore[method-assign]
    agent = Agent(config(images, rate_hz=20), engine_loader=lambda c: engine)
    agent.start()
    try:
        notify_socket.wait_for("READY", "1")
        notify_socket.wait_for("WATCHDOG", "1")

        # when inference hangs for well beyond one ping interval (0.2 s)
        hang.set()
        deadline = time.monotonic() + 20
        while agent.status().last_progress_age_s < 0.5 and time.monotonic() < deadline:
            time.sleep(0.02)
        notify_socket.drain()
        notify_socket.cursor = len(notify_socket.messages)
        while agent.status().last_progress_age_s < 1.5 and time.monotonic() < deadline:
            time.sleep(0.02)
        during_hang = notify_socket.drain()

        # and then goes on
        hang.clear()
        unhang.set()
        notify_socket.wait_for("WATCHDOG", "1")
    finally:
        agent.stop()

    # then no ping went out during the hang, though STATUS lines still did
    assert agent.status().last_progress_age_s >= 0  # the snapshot still answers after stop
    assert during_hang, "the status lines should keep coming during a hang"
    assert all("WATCHDOG" not in m for m in during_hang)
    assert any("STATUS" in m for m in during_hang)


def test_watchdog_keeps_pinging_on_an_idle_line(
    notify_socket: NotifySocket, images: Path, tmp_path: Path, make_inspector: Callable
) -> None:
    # given a hot folder with nothing in it
    hot = tmp_path / "hot"
    hot.mkdir()
    cfg = parse_config(
        {
            "station": "cell-1",
            "bundle": {"path": str(images)},
            "source": {"kind": "folder", "path": str(hot), "poll_interval": 0.05},
            "sinks": [],
            "status_log": {"interval_s": 0},
            "health": {"enabled": False},
        }
    )
    agent = Agent(cfg, engine_loader=lambda c: make_inspector())
    agent.start()
    try:
        # when several ping intervals pass without a frame
        pings = 0
        while pings < 5:
            notify_socket.wait_for("WATCHDOG", "1")
            pings += 1
    finally:
        agent.stop()

    # then the pings kept coming: an idle line is not a hang
    assert agent.status().counters["frames_in"] == 0


def test_reloading_around_a_bundle_swap(notify_socket: NotifySocket, images: Path, make_inspector: Callable) -> None:
    # given a running agent and a second engine of another version
    old, new = make_inspector(), make_inspector()
    new.manifest = type(old.manifest)(bundle_id="bundle-2", version="2026.02.02-1")
    agent = Agent(config(images, rate_hz=20), engine_loader=lambda c: old)
    agent.start()
    try:
        notify_socket.wait_for("READY", "1")

        # when
        agent.swap_engine(new, timeout=10)
        reloading = notify_socket.wait_for("RELOADING", "1")
        ready_again = notify_socket.wait_for("READY", "1")
    finally:
        agent.stop()

    # then RELOADING (with the monotonic time systemd asks for) came first, READY named the new bundle
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert "2026.02.02-1" in reloading["STATUS"] and "2026.02.02-1" in ready_again["STATUS"]


def test_no_notify_service_outside_systemd(
    monkeypatch: pytest.MonkeyPatch, images: Path, make_inspector: Callable
) -> None:
    # given no $NOTIFY_SOCKET (started by hand, not by systemd)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    # when
    agent = Agent(config(images), engine_loader=lambda c: make_inspector())

    # then the service is not built at all
    assert NotifyService.from_agent(agent) is None
