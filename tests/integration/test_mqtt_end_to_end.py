"""MQTT with the agent as a real process on the real bundle, a real mosquitto and a subscriber acting as
the PLC: the agent is SIGKILLed mid-stream (with a backlog in its outbox, the broker down) and restarted,
and no result is missing; a kill while connected leaves the retained status `offline` (the last will)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 90.0  # bundle verification, session creation, warm-up and golden check on a busy CPU
PREFIX = "lineside/plant-1/line-3/cell-07"


def write_config(tmp_path: Path, bundle: Path, port: int) -> Path:
    config = {
        "station": "cell-07",
        "bundle": {"path": str(bundle)},
        "inference": {"providers": ["cpu"], "verify_golden": False},
        "source": {
            "kind": "folder",
            "path": str(tmp_path / "hot"),
            "done_dir": str(tmp_path / "done"),
            "failed_dir": str(tmp_path / "failed"),
            "state_dir": str(tmp_path / "state"),
            "settle_seconds": 0.2,
            "poll_interval": 0.1,
            "patterns": ["*.png"],
        },
        "queue": {"capacity": 4, "policy": "block"},
        "sinks": [{"kind": "jsonl", "path": str(tmp_path / "results.jsonl"), "fsync": True}],
        "health": {"port": 0},  # tests run side by side: never the fixed 9464
        "mqtt": {
            "port": port,
            "topic_prefix": PREFIX,
            "outbox": {"path": str(tmp_path / "state" / "mqtt-outbox.sqlite")},
            "reconnect_min_s": 1,
            "reconnect_max_s": 2,
            "keepalive_s": 5,
        },
    }
    (tmp_path / "hot").mkdir(exist_ok=True)
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def done_count(tmp_path: Path) -> int:
    done = tmp_path / "done"
    return sum(1 for _ in done.rglob("*.png")) if done.exists() else 0


def test_agent_sigkilled_mid_stream_and_restarted_delivers_its_outbox_backlog_nothing_missing(
    tmp_path: Path, test_bundle: Path, synth_dir: Path, mosquitto: Callable, plc: Callable, daemons: Callable
) -> None:
    # given a broker, the PLC subscribed, and the agent inspecting 24 files dropped in its hot folder
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    config = write_config(tmp_path, test_bundle, broker.port)
    images = sorted(synth_dir.glob("Castings/S*/*.png"))[:24]
    assert len(images) == 24
    daemon = daemons(config, tmp_path / "agent.log")
    daemon.wait_for(lambda: any(s["state"] == "online" for s in line.json_on("status")), "status online")
    for i, image in enumerate(images):
        shutil.copy(image, tmp_path / "hot" / f"P{i:02d}_{image.name}")
    daemon.wait_for(lambda: len(line.result_ids()) >= 3, "the first results at the PLC")

    # when the broker goes down, results pile up in the outbox, and the agent is SIGKILLed mid-stream
    broker.stop()
    backlog_from = done_count(tmp_path)
    daemon.wait_for(lambda: done_count(tmp_path) >= backlog_from + 3, "files done while the broker is down")
    daemon.kill()
    received_before_restart = len(line.result_ids())
    assert done_count(tmp_path) > received_before_restart  # a backlog existed only in the outbox

    # and the broker and the agent are started again
    broker.start()
    daemon = daemons(config, tmp_path / "agent-2.log")
    daemon.wait_for(lambda: done_count(tmp_path) == 24, "every file done", timeout=STARTUP_S + 120)
    daemon.wait_for(lambda: len(line.result_ids()) == 24, "every result at the PLC", timeout=60)

    # then the PLC holds exactly the results of the 24 files, none missing, each file once
    results = {item["result_id"]: item for item in line.json_on("result")}
    assert set(results) == set(line.result_ids())
    files = sorted(item["meta"]["file"] for item in results.values())
    assert files == sorted(f"P{i:02d}_{image.name}" for i, image in enumerate(images))
    jsonl = [json.loads(x)["result_id"] for x in (tmp_path / "results.jsonl").read_text().splitlines() if x]
    assert set(jsonl) == set(results)

    # when the agent is killed while connected, then the broker publishes its last will: status offline
    daemon.kill()
    line.wait_for(lambda: line.json_on("status")[-1]["state"] == "offline", "the last will (offline)")
    status: Any = line.json_on("status")[-1]
    assert status["station"] == "cell-07"
