"""MQTT against a real mosquitto broker, with a subscriber acting as the PLC: results through the durable
outbox (in order, nothing lost across a broker outage), status with its last will, events, metrics."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lineside.agent.config import AgentConfig, parse_config
from lineside.agent.mqtt.outbox import Outbox
from lineside.agent.runtime import Agent

PREFIX = "lineside/plant-1/line-3/cell-07"


@pytest.fixture
def images(tmp_path: Path, put_png: Callable[..., Path]) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        put_png(folder / f"img{i}.png", value=20 * i + 10)
    return folder


def mqtt_config(tmp_path: Path, images: Path, port: int, *, source: dict[str, Any], **mqtt: Any) -> AgentConfig:
    return parse_config(
        {
            "station": "cell-07",
            "bundle": {"path": str(images)},  # not read: the tests give their own engine
            "source": {"kind": "replay", "path": str(images), **source},
            "sinks": [{"kind": "jsonl", "path": str(tmp_path / "results.jsonl")}],
            "status_log": {"interval_s": 0},
            "mqtt": {
                "port": port,
                "topic_prefix": PREFIX,
                "outbox": {"path": str(tmp_path / "outbox.sqlite"), "synchronous": "normal"},
                "reconnect_min_s": 1,
                "reconnect_max_s": 1,
                "metrics_interval_s": 0,
                **mqtt,
            },
        }
    )


@pytest.fixture
def run_agent(make_inspector: Callable) -> Iterator[Callable[[AgentConfig], Agent]]:
    """Starts agents in-process with a recording engine; stops them when the test ends."""
    agents: list[Agent] = []

    def start(config: AgentConfig) -> Agent:
        agent = Agent(config, engine_loader=lambda c: make_inspector())
        agents.append(agent)
        agent.start()
        return agent

    yield start
    for agent in agents:
        agent.stop()


def jsonl_ids(path: Path) -> list[str]:
    return [json.loads(line)["result_id"] for line in path.read_text().splitlines() if line.strip()]


def outbox_depth(tmp_path: Path) -> int:
    outbox = Outbox(tmp_path / "outbox.sqlite")
    try:
        return outbox.depth()
    finally:
        outbox.close()


def test_results_reach_the_plc_as_the_jsonl_sink_writes_them_and_status_goes_online_then_stopped(
    tmp_path: Path, images: Path, mosquitto: Callable, plc: Callable, run_agent: Callable
) -> None:
    # given a broker, a PLC subscribed to the station's topics and an agent replaying 12 frames
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    agent = run_agent(mqtt_config(tmp_path, images, broker.port, source={"loop": True, "max_frames": 12}))

    # when the frames have been inspected and the agent stops cleanly
    line.wait_for(lambda: len(line.result_ids()) == 12, "12 results")
    agent.wait()
    agent.stop()
    line.wait_for(lambda: any(s["state"] == "stopped" for s in line.json_on("status")), "status stopped")

    # then every result arrived once, byte for byte what the JSON-lines sink wrote, in the same order
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert [p.decode() for p in line.on("result")] == lines
    # and status went online (with the bundle) then stopped, retained, and the outbox is empty
    states = line.json_on("status")
    assert states[0]["state"] == "online" and states[0]["bundle_version"] == "2026.01.01-1"
    assert states[-1]["state"] == "stopped"
    assert outbox_depth(tmp_path) == 0
    # and the agent's start went out as an event
    assert "started" in [e["kind"] for e in line.json_on("event")]


def test_broker_stopped_while_frames_flow_and_restarted_every_result_arrives_in_order_zero_lost(
    tmp_path: Path, images: Path, mosquitto: Callable, plc: Callable, run_agent: Callable
) -> None:
    # given an agent streaming 90 frames at 30 Hz to a broker the PLC is subscribed to
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    agent = run_agent(
        mqtt_config(tmp_path, images, broker.port, source={"loop": True, "rate_hz": 30, "max_frames": 90})
    )
    line.wait_for(lambda: len(line.result_ids()) >= 10, "the first results")

    # when the broker stops while frames flow, results pile up in the outbox, and the broker comes back
    broker.stop()
    produced = len(jsonl_ids(tmp_path / "results.jsonl"))
    line.wait_for(lambda: len(jsonl_ids(tmp_path / "results.jsonl")) >= produced + 15, "results during the outage")
    assert agent.status().counters["acks"]["ok"] >= produced + 15  # frames went on being acknowledged
    broker.start()
    agent.wait()

    # then every result arrives, in the order the agent made them, and none is missing
    expected = jsonl_ids(tmp_path / "results.jsonl")
    assert len(expected) == 90
    line.wait_for(lambda: len(line.result_ids()) == 90, "all 90 results after the outage", timeout=90)
    assert line.result_ids() == expected
    lost = set(expected) - set(line.result_ids())
    assert lost == set()
    # and the status went online again after the reconnect
    assert [s["state"] for s in line.json_on("status")].count("online") >= 2
