"""/healthz, /readyz and /metrics scraped over real HTTP from an agent running in-process."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lineside.agent.config import AgentConfig, parse_config
from lineside.agent.errors import EXIT_FAILURE
from lineside.agent.runtime import Agent
from lineside.agent.services.health import HealthService


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text page, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def images(tmp_path: Path, put_png: Callable[..., Path]) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        put_png(folder / f"img{i}.png", value=60 * i + 10)  # some defective (score >= 0.3), some not
    return folder


def agent_config(images: Path, source: dict[str, Any], **extra: Any) -> AgentConfig:
    return parse_config(
        {
            "station": "cell-1",
            "bundle": {"path": str(images)},
            "source": source,
            "sinks": [],
            "status_log": {"interval_s": 0},
            "notify": {"enabled": False},
            "health": {"port": 0},
            **extra,
        }
    )


@pytest.fixture
def running(images: Path, make_inspector: Callable) -> Iterator[Callable[..., tuple[Agent, str]]]:
    """Start an agent with the registered services; yields (agent, base URL); stops them all after."""
    agents: list[Agent] = []

    def start(source: dict[str, Any], **kwargs: Any) -> tuple[Agent, str]:
        agent = Agent(agent_config(images, source), engine_loader=lambda c: make_inspector(), **kwargs)
        agents.append(agent)
        agent.start()
        health = next(s for s in agent.services if isinstance(s, HealthService))
        return agent, f"http://127.0.0.1:{health.port}"

    yield start
    for agent in agents:
        agent.stop()


def test_metrics_move_as_frames_flow(running: Callable[..., tuple[Agent, str]], images: Path) -> None:
    # given an agent replaying images in a loop
    agent, url = running({"kind": "replay", "path": str(images), "loop": True, "rate_hz": 50})
    wait_until(lambda: agent.status().counters.get("results_out", 0) >= 4)

    # when scraped twice, frames flowing in between
    status1, first = get(f"{url}/metrics")
    before = samples(first)
    seen = before[("lineside_frames_total", ())]
    wait_until(lambda: agent.status().counters["results_out"] >= seen + 4)
    status2, second = get(f"{url}/metrics")
    after = samples(second)

    # then the figures are real and moved
    assert status1 == status2 == 200
    assert after[("lineside_frames_total", ())] > before[("lineside_frames_total", ())] >= 4
    total = ("lineside_stage_latency_seconds_count", (("stage", "total"),))
    assert after[total] > before[total] >= 4
    assert after[("lineside_stage_latency_seconds_count", (("stage", "inference"),))] > 0
    assert after[("lineside_defects_total", ())] > 0
    assert after[("lineside_defects_total", ())] < after[("lineside_results_total", ())]
    assert (
        after[
            ("lineside_bundle_info", (("bundle_id", "test-bundle"), ("station", "cell-1"), ("version", "2026.01.01-1")))
        ]
        == 1
    )
    assert after[("lineside_provider", (("provider", "CPUExecutionProvider"),))] == 1
    assert after[("lineside_state", (("state", "running"),))] == 1
    assert after[("process_resident_memory_bytes", ())] > 10e6
    assert ("lineside_queue_depth", (("queue", "frames"),)) in after


def test_errors_and_drops_are_counted_by_reason(
    running: Callable[..., tuple[Agent, str]], images: Path, tmp_path: Path
) -> None:
    # given one undecodable image among the replayed ones
    (images / "broken.png").write_bytes(b"not an image")
    agent, url = running({"kind": "replay", "path": str(images)})
    wait_until(lambda: agent.pipeline is not None and agent.pipeline.finished)

    # when
    _, text = get(f"{url}/metrics")

    # then
    found = samples(text)
    assert found[("lineside_errors_total", (("code", "decode_failed"),))] == 1
    assert found[("lineside_frames_total", ())] == 5


def test_healthz_and_readyz_while_running(running: Callable[..., tuple[Agent, str]], tmp_path: Path) -> None:
    # given an idle hot folder
    hot = tmp_path / "hot"
    hot.mkdir()
    _agent, url = running({"kind": "folder", "path": str(hot), "poll_interval": 0.05})

    # when
    alive, alive_body = get(f"{url}/healthz")
    ready, ready_body = get(f"{url}/readyz")
    missing, _ = get(f"{url}/nothing")

    # then an idle line is alive and ready
    assert alive == 200 and json.loads(alive_body)["ok"] is True
    assert ready == 200 and json.loads(ready_body)["bundle_version"] == "2026.01.01-1"
    assert missing == 404


def test_readyz_fails_while_the_hot_folder_is_gone_and_recovers(
    running: Callable[..., tuple[Agent, str]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # given a running agent on a hot folder
    hot = tmp_path / "hot"
    hot.mkdir()
    agent, url = running({"kind": "folder", "path": str(hot), "poll_interval": 0.05})
    assert get(f"{url}/readyz")[0] == 200

    # when the folder disappears (an unmounted share) for several polls, then comes back
    caplog.set_level(logging.INFO, logger="lineside.agent.sources.folder")
    hot.rename(tmp_path / "elsewhere")
    wait_until(lambda: agent.status().counters["source"].get("scan_errors", 0) >= 5)
    gone, gone_body = get(f"{url}/readyz")
    alive_meanwhile = get(f"{url}/healthz")[0]
    (tmp_path / "elsewhere").rename(hot)
    wait_until(lambda: f"hot folder {hot} is back" in caplog.text)
    back = get(f"{url}/readyz")[0]

    # then not ready, naming the folder, while still alive; ready again once it is back
    assert gone == 503
    assert json.loads(gone_body)["problems"] == [f"hot folder {hot} is missing"]
    assert alive_meanwhile == 200
    assert back == 200
    # one warning for the outage and one line for the recovery, not one per poll
    assert caplog.text.count("cannot scan hot folder") == 1
    assert caplog.text.count(f"hot folder {hot} is back") == 1


def test_readyz_fails_while_a_sink_fails(
    running: Callable[..., tuple[Agent, str]], images: Path, make_sink: Callable
) -> None:
    # given a sink that fails on every result
    agent, url = running(
        {"kind": "replay", "path": str(images), "loop": True, "rate_hz": 50}, sinks=[make_sink("disk", fail=True)]
    )
    wait_until(lambda: agent.status().counters["sink_failures"]["disk"] >= 2)

    # when
    code, body = get(f"{url}/readyz")
    _, text = get(f"{url}/metrics")

    # then
    assert code == 503 and "sink disk failing" in json.loads(body)["problems"]
    assert samples(text)[("lineside_sink_failures_total", (("sink", "disk"),))] >= 2


def test_a_port_in_use_is_a_clear_start_up_error(
    images: Path, make_inspector: Callable, caplog: pytest.LogCaptureFixture
) -> None:
    # given the health port already taken by another process
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    config = agent_config(images, {"kind": "replay", "path": str(images), "loop": True}).model_copy(
        update={
            "health": agent_config(images, {"kind": "replay", "path": str(images)}).health.model_copy(
                update={"port": port}
            )
        }
    )
    agent = Agent(config, engine_loader=lambda c: make_inspector())

    # when
    with caplog.at_level(logging.ERROR):
        code = agent.run()
    holder.close()

    # then the start fails with exit 1 and a line naming the address; nothing is left running
    assert code == EXIT_FAILURE
    assert f"health endpoint cannot listen on 127.0.0.1:{port}" in caplog.text
    assert "another lineside-agent" in caplog.text
    assert agent.status().state == "failed"


def test_the_mqtt_outbox_depth_is_a_queue_metric(images: Path, make_inspector: Callable, tmp_path: Path) -> None:
    # given MQTT configured towards a broker that is down (a port nobody listens on): results wait in the outbox
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        unused_tcp_port = probe.getsockname()[1]
    config = agent_config(
        images,
        {"kind": "replay", "path": str(images)},
        mqtt={
            "port": unused_tcp_port,
            "topic_prefix": "lineside/test",
            "outbox": {"path": str(tmp_path / "outbox.sqlite"), "synchronous": "normal"},
            "reconnect_min_s": 1,
            "reconnect_max_s": 1,
            "metrics_interval_s": 0,
            "drain_timeout_s": 0.1,
        },
    )
    agent = Agent(config, engine_loader=lambda c: make_inspector())
    agent.start()
    try:
        agent.wait()  # the 4 images replayed once
        health = next(s for s in agent.services if isinstance(s, HealthService))
        wait_until(lambda: agent.status().queue_depths.get("mqtt_outbox", 0) >= 4)

        # when
        _, text = get(f"http://127.0.0.1:{health.port}/metrics")
    finally:
        agent.stop()

    # then the outbox sits beside the frame queue, holding at least the 4 results (plus events)
    found = samples(text)
    assert found[("lineside_queue_depth", (("queue", "mqtt_outbox"),))] >= 4
    assert ("lineside_queue_depth", (("queue", "frames"),)) in found


@pytest.mark.gpu
def test_gpu_memory_is_in_metrics_on_an_nvidia_box(running: Callable[..., tuple[Agent, str]], images: Path) -> None:
    # given an agent on a box with the NVIDIA driver
    _agent, url = running({"kind": "replay", "path": str(images), "loop": True, "rate_hz": 5})

    # when
    found = samples(get(f"{url}/metrics")[1])

    # then device 0's memory is reported, used within total
    total = found[("lineside_gpu_memory_total_bytes", (("gpu", "0"),))]
    assert total > 1e9
    assert 0 < found[("lineside_gpu_memory_used_bytes", (("gpu", "0"),))] <= total


def test_without_nvml_there_is_no_gpu_metric_and_no_error(
    running: Callable[..., tuple[Agent, str]], images: Path
) -> None:
    # given
    agent, url = running({"kind": "replay", "path": str(images), "loop": True, "rate_hz": 5})
    health = next(s for s in agent.services if isinstance(s, HealthService))

    # when
    code, text = get(f"{url}/metrics")

    # then the page is served either way, with GPU figures exactly when NVML answered
    assert code == 200
    assert ("lineside_gpu_memory_total_bytes" in text) == bool(health.metrics.gpu.memory())


class _CountingService:
    """A service that reports counters, as uploads and updates do."""

    name = "counting"
    section = "counting"

    @classmethod
    def from_agent(cls, agent: Agent) -> _CountingService:
        return cls()

    def start(self, stop: Any) -> None:
        return None

    def close(self) -> None:
        return None

    def counters(self) -> dict[str, int]:
        return {"uploaded": 3, "evicted": 1}


def test_service_counters_are_exported_by_service_and_counter(
    images: Path, make_inspector: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a service with counters started beside the health service
    import lineside.agent.runtime as runtime

    monkeypatch.setattr(runtime, "SERVICE_PLUGINS", (_CountingService, HealthService))
    agent = Agent(
        agent_config(images, {"kind": "replay", "path": str(images)}), engine_loader=lambda c: make_inspector()
    )
    agent.start()
    try:
        health = next(s for s in agent.services if isinstance(s, HealthService))
        # when
        _, text = get(f"http://127.0.0.1:{health.port}/metrics")
        status = agent.status()
    finally:
        agent.stop()

    # then
    assert status.service_counters == {"counting": {"uploaded": 3, "evicted": 1}}
    found = samples(text)
    assert found[("lineside_service_events_total", (("counter", "uploaded"), ("service", "counting")))] == 3
    assert found[("lineside_service_events_total", (("counter", "evicted"), ("service", "counting")))] == 1
