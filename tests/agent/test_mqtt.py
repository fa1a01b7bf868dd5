"""MQTT against a real mosquitto broker, with a subscriber acting as the PLC: results through the durable
outbox (in order, nothing lost across a broker outage), status with its last will, events, metrics."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lineside.agent.config import AgentConfig, parse_config
from lineside.agent.events import Event
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
            "health": {"port": 0},  # tests run side by side: never the fixed 9464
            "mqtt": {
                "port": port,
                "topic_prefix": PREFIX,
                "outbox": {"path": str(tmp_path / "outbox.sqlite"), "synchronous": "normal"},
                "reconnect_min_s": 1,
                "reconnect_max_s": 1,
                "metrics_interval_s": 0,
                "state_dir": str(tmp_path / "state"),
                **mqtt,
            },
        }
    )


@pytest.fixture
def run_agent(make_inspector: Callable) -> Iterator[Callable[[AgentConfig], Agent]]:
    """Starts agents in-process with a recording engine; stops them when the test ends."""
    agents: list[Agent] = []

    def start(config: AgentConfig, on_event: Callable[[Event], None] | None = None) -> Agent:
        agent = Agent(config, engine_loader=lambda c: make_inspector())
        if on_event is not None:
            agent.events.subscribe(on_event)  # before start: the first events come during it
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


def reply_to(line: Any, command: str, count: int = 1) -> dict[str, Any]:
    line.wait_for(lambda: len(line.on(f"cmd/{command}/reply")) >= count, f"reply {count} to {command}")
    return line.json_on(f"cmd/{command}/reply")[count - 1]


def test_commands_pause_resume_status_and_trigger_reply_and_act(
    tmp_path: Path, images: Path, mosquitto: Callable, plc: Callable, run_agent: Callable
) -> None:
    # given an agent replaying a looping stream at 20 Hz, connected to the PLC's broker
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    agent = run_agent(mqtt_config(tmp_path, images, broker.port, source={"loop": True, "rate_hz": 20}))
    line.wait_for(lambda: any(s["state"] == "online" for s in line.json_on("status")), "status online")

    # when the PLC pauses the station
    line.send("pause", b'{"request_id": "p-1"}')
    reply = reply_to(line, "pause")
    # then the reply says ok, the agent is paused and says so in events and in the status reply
    assert reply == {"command": "pause", "ok": True, "request_id": "p-1", "error": None, "result": reply["result"]}
    assert agent.status().paused
    line.send("status", b"")
    assert reply_to(line, "status")["result"]["paused"] is True
    line.wait_for(lambda: "paused" in [e["kind"] for e in line.json_on("event")], "the paused event")

    # when it triggers the next frame with a part serial and view, and resumes
    line.send("trigger", json.dumps({"part_id": "W-000123", "view": 2}))
    assert reply_to(line, "trigger")["ok"] is True
    line.send("resume", b"{}")
    assert reply_to(line, "resume")["ok"] is True

    # then the next result carries the part serial and view, exactly once
    line.wait_for(lambda: any(r["part_id"] == "W-000123" for r in line.json_on("result")), "the tagged result")
    tagged = [r for r in line.json_on("result") if r["part_id"] == "W-000123"]
    assert len(tagged) == 1 and tagged[0]["view"] == 2 and tagged[0]["meta"]["tagged_by"] == "trigger"
    assert not agent.status().paused


def test_a_command_with_an_mqtt5_response_topic_gets_its_reply_there_with_the_correlation_data(
    tmp_path: Path, images: Path, mosquitto: Callable, plc: Callable, run_agent: Callable
) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    # given a connected agent
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    run_agent(mqtt_config(tmp_path, images, broker.port, source={"loop": True, "rate_hz": 5}))
    line.wait_for(lambda: any(s["state"] == "online" for s in line.json_on("status")), "status online")

    # when a status command names a response topic and correlation data
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = f"{PREFIX}/replies/scada-1"
    props.CorrelationData = b"corr-42"
    line.send("status", b"{}", properties=props)

    # then the reply arrives there too, with the correlation data
    line.wait_for(lambda: len(line.on("replies/scada-1")) == 1, "the reply on the response topic")
    assert json.loads(line.on("replies/scada-1")[0])["ok"] is True
    assert line.last_properties.CorrelationData == b"corr-42"


BAD_COMMANDS = [
    ("pause", b"{not json", "not valid JSON"),
    ("pause", b"[1, 2]", "must be a JSON object"),
    ("trigger", b"{}", "part_id"),
    ("trigger", b'{"part_id": "A 1; DROP"}', "part_id"),
    ("trigger", b'{"part_id": "W1", "view": -3}', "view"),
    ("trigger", b'{"part_id": "W1", "view": "two"}', "view"),
    ("pause", b'{"unknown": 1}', "unknown"),
    ("reboot", b"{}", "unknown command"),
    ("pause", b'{"request_id": "' + b"x" * 5000 + b'"}', "over the limit"),
    ("pause", b"\xff\xfe", "not valid JSON"),
    ("trigger", b'{"file": "/etc/hostname"}', "trigger_folders is empty"),
    ("trigger", b'{"view": 1}', "part_id"),
    ("set-thresholds", b'{"thresholds": {"classifier": {"image": 0.5}}}', "no adjustable thresholds"),
]


@pytest.mark.parametrize(("command", "payload", "error"), BAD_COMMANDS)
def test_an_invalid_command_gets_an_error_reply_and_changes_nothing(
    tmp_path: Path,
    images: Path,
    mosquitto: Callable,
    plc: Callable,
    run_agent: Callable,
    command: str,
    payload: bytes,
    error: str,
) -> None:
    # given a running agent, not paused, no trigger pending
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    agent = run_agent(mqtt_config(tmp_path, images, broker.port, source={"loop": True, "rate_hz": 5}))
    line.wait_for(lambda: any(s["state"] == "online" for s in line.json_on("status")), "status online")

    # when the PLC sends an invalid command
    line.send(command, payload)

    # then it gets an error reply naming the problem, and the agent's state did not change
    reply = reply_to(line, command)
    assert reply["ok"] is False and error in reply["error"]
    assert not agent.status().paused and agent.pipeline.pending_tag() is None


def test_a_switched_off_command_is_refused(
    tmp_path: Path, images: Path, mosquitto: Callable, plc: Callable, run_agent: Callable
) -> None:
    # given an agent whose config allows only status
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    agent = run_agent(
        mqtt_config(
            tmp_path, images, broker.port, source={"loop": True, "rate_hz": 5}, commands={"enabled": ["status"]}
        )
    )
    line.wait_for(lambda: any(s["state"] == "online" for s in line.json_on("status")), "status online")
    # when the PLC sends pause, then it is refused and nothing changes
    line.send("pause", b"{}")
    assert "switched off" in reply_to(line, "pause")["error"]
    assert not agent.status().paused


def test_arbitrary_payloads_on_every_command_topic_never_crash_the_agent_nor_change_it_when_invalid(
    tmp_path: Path,
    images: Path,
    mosquitto: Callable,
    plc: Callable,
    run_real_agent: Callable,
    put_png: Callable[..., Path],
) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from lineside.agent.mqtt.payloads import COMMAND_MODELS

    # given one running agent (the real bundle: its thresholds can change) and broker for every example
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    put_png(allowed / "ok.png", value=30)
    put_png(tmp_path / "outside.png", value=30)
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    agent = run_real_agent(
        mqtt_config(
            tmp_path,
            images,
            broker.port,
            source={"loop": True, "rate_hz": 5},
            commands={"trigger_folders": [str(allowed)]},
        )
    )
    online(line)
    state_file = tmp_path / "state" / "thresholds.json"

    def state() -> tuple[Any, ...]:
        return (
            agent.status().paused,
            agent.pipeline.pending_tag(),
            agent.engine.effective_thresholds(),
            state_file.exists(),
        )

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
        max_leaves=10,
    )
    payloads = st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())
    invalid_fields = st.dictionaries(
        st.sampled_from(["part_id", "view", "request_id", "x", "file", "thresholds", "reset"]),
        json_values,
        min_size=1,
        max_size=3,
    ).map(lambda d: json.dumps(d).encode())
    # Threshold-shaped requests: real kinds and fields, values in and far out of the bundle's bounds.
    threshold_requests = st.dictionaries(
        st.sampled_from(["classifier", "ssd", "vae", "unet", ""]),
        st.dictionaries(
            st.sampled_from(["image", "box", "pixel", "min_area", "kind"]),
            st.floats(allow_nan=False, min_value=-1e12, max_value=1e12) | st.integers(-5, 10**6) | json_values,
            max_size=3,
        ),
        max_size=3,
    ).map(lambda d: json.dumps({"thresholds": d}).encode())
    files = st.sampled_from(
        [str(tmp_path / "outside.png"), f"{allowed}/../outside.png", "ok.png", str(allowed), "/etc/passwd", ""]
    ).map(lambda f: json.dumps({"file": f, "part_id": "P1"}).encode())
    sent = {"n": 0}

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(command=st.sampled_from(["status", "nope", "cmd"]), payload=payloads | invalid_fields)
    def throw(command: str, payload: bytes) -> None:
        before = state()
        replies = len(line.on(f"cmd/{command}/reply"))
        line.send(command, payload)
        reply = reply_to(line, command, replies + 1)
        sent["n"] += 1
        # then a reply always comes, and state is unchanged (status and unknown commands change nothing)
        assert state() == before
        assert reply["ok"] is (command == "status" and reply["error"] is None)

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        command=st.sampled_from(["pause", "resume", "trigger", "set-thresholds"]),
        payload=payloads | invalid_fields | threshold_requests | files,
    )
    def throw_at_stateful(command: str, payload: bytes) -> None:
        model = COMMAND_MODELS[command]
        try:
            valid = model.model_validate_json(payload.strip() or b"{}") is not None and len(payload) <= 4096
        except ValueError:
            valid = False
        if valid and command != "set-thresholds":
            return  # a valid command is meant to act (set-thresholds may still be out of bounds: sent)
        before = state()
        replies = len(line.on(f"cmd/{command}/reply"))
        line.send(command, payload)
        reply = reply_to(line, command, replies + 1)
        sent["n"] += 1
        if reply["ok"]:
            # only a request valid in form and within the bundle's bounds may act; undo it for the next one
            assert valid and command == "set-thresholds"
            agent.engine.set_threshold_overrides({})
            state_file.unlink()
            return
        assert reply["error"]
        assert state() == before

    # when hypothesis throws arbitrary payloads at every command topic
    throw()
    throw_at_stateful()

    # then the agent still runs and still answers
    assert sent["n"] > 60
    assert agent.status().state == "running"
    replies = len(line.on("cmd/status/reply"))
    line.send("status", b"")
    assert reply_to(line, "status", replies + 1)["ok"] is True


def test_username_and_password_from_the_credential_reach_the_broker_and_a_wrong_one_is_refused_without_a_crash(
    tmp_path: Path,
    images: Path,
    mosquitto: Callable,
    plc: Callable,
    run_agent: Callable,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import subprocess

    # given a broker that accepts only known users, and a PLC logged in as itself
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "cell-07", "s3cret"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(passwords), "plc", "plc-pass"], check=True)
    broker = mosquitto(extra_conf=f"allow_anonymous false\npassword_file {passwords}\n")
    line = plc(broker.port, PREFIX, username="plc", password="plc-pass")

    # when an agent connects with a wrong password (the credential, never the YAML)
    monkeypatch.setenv("LINESIDE_MQTT_PASSWORD", "wrong")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    config = mqtt_config(tmp_path, images, broker.port, source={"max_frames": 3}, username="cell-07")
    refused: list[Event] = []
    wrong = run_agent(config, lambda e: refused.append(e) if e.kind == "mqtt_refused" else None)
    line.wait_for(lambda: len(refused) >= 1, "the refusal reported as an event")
    wrong.wait()

    # then the agent keeps running and keeps its results in the outbox (nothing published, nothing lost)
    assert wrong.status().state == "running"
    assert line.on("result") == []
    wrong.stop()
    assert outbox_depth(tmp_path) >= 3

    # when it restarts with the right password, then the backlog arrives
    monkeypatch.setenv("LINESIDE_MQTT_PASSWORD", "s3cret")
    run_agent(config)
    line.wait_for(lambda: len(line.result_ids()) == 3, "the 3 results after the right password")


def test_a_missing_tls_file_is_a_config_error_naming_the_key(
    tmp_path: Path, images: Path, make_inspector: Callable
) -> None:
    # given an mqtt section whose CA file does not exist
    config = mqtt_config(tmp_path, images, 8883, source={}, tls={"ca_file": str(tmp_path / "nope" / "ca.pem")})

    # when the paths are checked, and when the agent runs anyway
    problems = config.problems()
    engine = make_inspector()
    code = Agent(config, engine_loader=lambda c: engine).run()

    # then check-config names the key, and the agent exits 78 (configuration) before serving anything
    assert any(p.startswith("mqtt.tls.ca_file: ") and "does not exist" in p for p in problems)
    assert code == 78
    assert engine.calls == [] and engine.closed


# -- set-thresholds and trigger with a file ------------------------------------------------------------


@pytest.fixture
def run_real_agent(classifier_rule_bundle: Path) -> Iterator[Callable[[AgentConfig], Agent]]:
    """Starts agents serving the real test bundle (its rule including the classifier) on CPU, thresholds
    the bundle's; stops them at the end."""
    from lineside.agent.inference.engine import InferenceEngine

    agents: list[Agent] = []

    def start(config: AgentConfig) -> Agent:
        agent = Agent(
            config,
            engine_loader=lambda c: InferenceEngine.load(
                classifier_rule_bundle, providers=["cpu"], verify_golden=False
            ),
        )
        agents.append(agent)
        agent.start()
        return agent

    yield start
    for agent in agents:
        agent.stop()


def online(line: Any) -> None:
    line.wait_for(lambda: any(s["state"] == "online" for s in line.json_on("status")), "status online")


def test_set_thresholds_changes_the_verdicts_is_reported_and_survives_a_restart(
    tmp_path: Path, images: Path, mosquitto: Callable, plc: Callable, run_real_agent: Callable
) -> None:
    # given an agent serving the real bundle, replaying a looping stream
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    config = mqtt_config(tmp_path, images, broker.port, source={"loop": True, "rate_hz": 10})
    agent = run_real_agent(config)
    online(line)
    bundle = agent.engine.thresholds()

    # when the PLC sets the classifier's threshold to 0 (every frame fires) and the SSD box threshold
    line.send(
        "set-thresholds",
        json.dumps({"request_id": "t-1", "thresholds": {"classifier": {"image": 0.0}, "ssd": {"box": 0.9}}}),
    )
    reply = reply_to(line, "set-thresholds")

    # then the reply is ok and gives the thresholds now in force
    assert reply["ok"] is True and reply["request_id"] == "t-1", reply
    assert reply["result"]["thresholds"]["classifier"]["image"] == 0.0
    assert reply["result"]["thresholds"]["ssd"] == {**bundle["ssd"].model_dump(mode="json"), "box": 0.9}
    assert reply["result"]["changed"] == ["classifier", "ssd"]
    # and it went out as an event naming old and new values
    line.wait_for(lambda: "thresholds_changed" in [e["kind"] for e in line.json_on("event")], "the event")
    event = next(e for e in line.json_on("event") if e["kind"] == "thresholds_changed")
    assert event["data"]["changed"]["classifier"]["from"]["image"] == pytest.approx(bundle["classifier"].image)
    assert event["data"]["changed"]["classifier"]["to"]["image"] == 0.0
    assert event["data"]["request_id"] == "t-1"
    # and frames inspected from now on are decided with it: every one fires
    seen = len(line.on("result"))
    line.wait_for(lambda: len(line.on("result")) >= seen + 6, "results after the change")
    later = line.json_on("result")[seen + 3 :]
    assert later and all(r["is_defective"] is True and r["score"] == 1.0 for r in later)
    # and the state file holds the overrides for this bundle version
    saved = json.loads((tmp_path / "state" / "thresholds.json").read_text())
    assert saved["bundle_version"] == agent.engine.manifest.version
    assert saved["overrides"]["classifier"]["image"] == 0.0 and saved["overrides"]["ssd"]["box"] == 0.9

    # when the agent restarts
    agent.stop()
    again = run_real_agent(config)

    # then the overrides are in force again, and the restore is reported
    assert again.engine.effective_thresholds()["classifier"].image == 0.0
    assert again.engine.effective_thresholds()["ssd"].box == 0.9
    line.wait_for(lambda: "thresholds_restored" in [e["kind"] for e in line.json_on("event")], "the restore event")

    # when the PLC resets, then the bundle's thresholds are back, also after the next restart
    line.send("set-thresholds", b'{"reset": true}')
    reset = reply_to(line, "set-thresholds", 2)
    assert reset["ok"] is True and reset["result"]["overrides"] == {}
    assert again.engine.threshold_overrides() == {}
    again.stop()
    third = run_real_agent(config)
    assert third.engine.threshold_overrides() == {}


def test_a_swapped_in_bundle_reports_that_the_overrides_no_longer_apply(
    tmp_path: Path, images: Path, mosquitto: Callable, plc: Callable, run_real_agent: Callable,
    classifier_rule_bundle: Path,
) -> None:  # fmt: skip
    # given an agent whose operator overrode the classifier's threshold
    from lineside.agent.inference.engine import InferenceEngine

    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    agent = run_real_agent(mqtt_config(tmp_path, images, broker.port, source={"loop": True, "rate_hz": 5}))
    online(line)
    line.send("set-thresholds", json.dumps({"thresholds": {"classifier": {"image": 0.0}}}))
    assert reply_to(line, "set-thresholds")["ok"] is True
    old = agent.engine.manifest.version

    # when another bundle is swapped in (as the updates service does)
    other = tmp_path / "other"
    shutil.copytree(classifier_rule_bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest.update(bundle_id="other-bundle", version="2027.01.01-1")
    (other / "manifest.json").write_text(json.dumps(manifest))
    agent.swap_engine(InferenceEngine.load(other, providers=["cpu"], verify_golden=False))

    # then the new bundle runs on its own thresholds, and the plant hears that the override is gone
    assert agent.engine.threshold_overrides() == {}
    line.wait_for(lambda: "thresholds_dropped" in [e["kind"] for e in line.json_on("event")], "thresholds_dropped")
    event = next(e for e in line.json_on("event") if e["kind"] == "thresholds_dropped")
    assert event["data"]["old_version"] == old and event["data"]["version"] == "2027.01.01-1"
    assert event["data"]["overrides"]["classifier"]["image"] == 0.0


BAD_THRESHOLDS = [
    ({"thresholds": {"classifier": {"image": 1.5}}}, "outside the bounds the bundle allows [0, 1]"),
    ({"thresholds": {"ssd": {"box": -0.1}}}, "outside the bounds"),
    ({"thresholds": {"vae": {"image": 1e9}}}, "outside the bounds"),
    ({"thresholds": {"vae": {"min_area": 0}}}, "outside the bounds"),
    ({"thresholds": {"vae": {"min_area": 120.5}}}, "integer"),
    ({"thresholds": {"unet": {"image": 0.5}}}, "unknown model kind 'unet'"),
    ({"thresholds": {"classifier": {"pixel": 0.5}}}, "cannot be set at run time"),
    ({"thresholds": {"classifier": {"kind": 1.0}}}, "cannot be set at run time"),
    ({"thresholds": {"ssd": {"box_scale": 1.2}}}, "ssd.box_scale cannot be set at run time"),
    ({"thresholds": {"classifier": {"image": "0.5"}}}, "valid number"),
    ({"thresholds": {"classifier": {"image": True}}}, "valid number"),
    ({"thresholds": {"classifier": {"image": None}}}, "valid number"),
    ({"thresholds": {"classifier": {}}}, "at least one field"),
    ({"thresholds": {}}, "either thresholds"),
    ({"reset": True, "thresholds": {"classifier": {"image": 0.2}}}, "either thresholds"),
    ({"reset": "yes"}, "reset"),
    ({"thresholds": {"classifier": {"image": 0.2}}, "extra": 1}, "extra"),
]


def test_invalid_set_thresholds_get_an_error_reply_and_change_nothing(
    tmp_path: Path, images: Path, mosquitto: Callable, plc: Callable, run_real_agent: Callable
) -> None:
    # given an agent serving the real bundle, with no overrides and no state file
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    agent = run_real_agent(mqtt_config(tmp_path, images, broker.port, source={"loop": True, "rate_hz": 2}))
    online(line)
    before = agent.engine.effective_thresholds()

    for count, (payload, error) in enumerate(
        [*BAD_THRESHOLDS, (b'{"thresholds": {"classifier": {"image": NaN}}}', "")], 1
    ):
        # when the PLC sends an invalid or out-of-bounds request
        line.send("set-thresholds", payload if isinstance(payload, bytes) else json.dumps(payload))
        reply = reply_to(line, "set-thresholds", count)
        # then it is refused, naming the problem, and nothing changed: engine, state file, events
        assert reply["ok"] is False and error in reply["error"], (payload, reply)
        assert agent.engine.effective_thresholds() == before
        assert agent.engine.threshold_overrides() == {}
        assert not (tmp_path / "state" / "thresholds.json").exists()
    assert "thresholds_changed" not in [e["kind"] for e in line.json_on("event")]


def test_saved_thresholds_of_another_bundle_version_are_not_applied_and_say_so(
    tmp_path: Path, images: Path, mosquitto: Callable, plc: Callable, run_real_agent: Callable
) -> None:
    # given a state file written for another bundle version
    state = tmp_path / "state"
    state.mkdir()
    (state / "thresholds.json").write_text(
        json.dumps({"bundle_id": "x", "bundle_version": "1999.01.01-1", "overrides": {"classifier": {"image": 0.0}}})
    )
    broker = mosquitto()
    line = plc(broker.port, PREFIX)

    # when the agent starts, then it keeps the bundle's thresholds and reports why
    agent = run_real_agent(mqtt_config(tmp_path, images, broker.port, source={"loop": True, "rate_hz": 2}))
    assert agent.engine.threshold_overrides() == {}
    line.wait_for(lambda: "thresholds_not_restored" in [e["kind"] for e in line.json_on("event")], "the event")
    event = next(e for e in line.json_on("event") if e["kind"] == "thresholds_not_restored")
    assert "1999.01.01-1" in event["message"]


def test_trigger_with_a_file_inside_an_allowed_folder_inspects_it_now_tagged_even_while_paused(
    tmp_path: Path,
    images: Path,
    mosquitto: Callable,
    plc: Callable,
    run_agent: Callable,
    put_png: Callable[..., Path],
) -> None:
    # given a paused agent whose config allows files from one folder
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    image = put_png(allowed / "sub" / "part.png", value=200)
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    agent = run_agent(
        mqtt_config(
            tmp_path,
            images,
            broker.port,
            source={"loop": True, "rate_hz": 5},
            commands={"trigger_folders": [str(allowed)]},
        )
    )
    online(line)
    agent.pause()

    # when the PLC names the file, with a part serial and view
    line.send("trigger", json.dumps({"file": str(image), "part_id": "W-77", "view": 3, "request_id": "f-1"}))
    reply = reply_to(line, "trigger")

    # then the reply gives the result id, and that result arrives tagged with the part, view and file
    assert reply["ok"] is True, reply
    result_id = reply["result"]["result_id"]
    line.wait_for(lambda: result_id in line.result_ids(), "the file's result")
    result = next(r for r in line.json_on("result") if r["result_id"] == result_id)
    assert (result["part_id"], result["view"], result["error"]) == ("W-77", 3, None)
    assert result["meta"] == {"file": str(image), "tagged_by": "trigger-file"}
    assert result["source"] == "trigger" and result["is_defective"] is not None
    # and the agent is still paused, the file is where it was, and no source frame was tagged
    assert agent.status().paused and image.exists() and agent.pipeline.pending_tag() is None


def test_trigger_with_a_file_outside_the_allowed_folders_is_refused_with_a_clear_error(
    tmp_path: Path,
    images: Path,
    mosquitto: Callable,
    plc: Callable,
    run_agent: Callable,
    put_png: Callable[..., Path],
) -> None:
    # given an allowed folder, an image outside it, and a symbolic link inside that points outside
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "folder").mkdir()
    outside = put_png(tmp_path / "outside.png", value=50)
    (allowed / "link.png").symlink_to(outside)
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    agent = run_agent(
        mqtt_config(
            tmp_path,
            images,
            broker.port,
            source={"loop": True, "rate_hz": 5},
            commands={"trigger_folders": [str(allowed)]},
        )
    )
    online(line)
    cases = [
        (str(outside), "outside the allowed folders"),
        (f"{allowed}/../outside.png", "outside the allowed folders"),
        (str(allowed / "link.png"), "outside the allowed folders"),
        (str(allowed / "missing.png"), "does not exist"),
        ("allowed/part.png", "must be an absolute path"),
        (str(allowed / "folder"), "not a regular file"),
    ]
    for count, (name, error) in enumerate(cases, 1):
        # when the PLC names it, then the reply is an error naming the problem
        line.send("trigger", json.dumps({"file": name}))
        reply = reply_to(line, "trigger", count)
        assert reply["ok"] is False and error in reply["error"], (name, reply)
    # and nothing was inspected from outside
    assert all(r["source"] != "trigger" for r in line.json_on("result"))
    assert agent.pipeline.pending_tag() is None


# -- part-level verdicts -------------------------------------------------------------------------------


def test_part_verdicts_once_all_views_are_in_and_after_a_timeout_naming_the_missing_views(
    tmp_path: Path,
    images: Path,
    mosquitto: Callable,
    plc: Callable,
    run_agent: Callable,
    put_png: Callable[..., Path],
) -> None:
    # given parts of 3 views (1, 2, 3) closed 3 s after their last view, and a paused agent (no source frames)
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    good = put_png(allowed / "good.png", value=30)  # the recording engine: mean < 0.3 -> good
    bad = put_png(allowed / "bad.png", value=200)
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    agent = run_agent(
        mqtt_config(
            tmp_path,
            images,
            broker.port,
            source={"loop": True, "rate_hz": 5},
            commands={"trigger_folders": [str(allowed)]},
            parts={"views": 3, "first_view": 1, "timeout_s": 3.0},
        )
    )
    online(line)
    agent.pause()

    def inspect(part: str, view: int, image: Path) -> None:
        count = len(line.on("cmd/trigger/reply"))
        line.send("trigger", json.dumps({"file": str(image), "part_id": part, "view": view}))
        assert reply_to(line, "trigger", count + 1)["ok"] is True

    def part(part_id: str) -> dict[str, Any]:
        line.wait_for(lambda: any(p["part_id"] == part_id for p in line.json_on("part")), f"part {part_id}")
        return next(p for p in line.json_on("part") if p["part_id"] == part_id)

    # when part A gets its 3 good views
    for view in (1, 2, 3):
        inspect("A", view, good)
    # then one part message says good, complete, with the 3 views' result ids
    a = part("A")
    assert (a["verdict"], a["complete"], a["closed_by"], a["views_missing"]) == ("good", True, "all_views", [])
    a_ids = {v["result_id"] for v in a["views"]}
    line.wait_for(lambda: a_ids <= set(line.result_ids()), "A's results")
    assert [v["view"] for v in a["views"]] == [1, 2, 3]

    # when part B gets a good view 1 and a defective view 2, then nothing more; part C only a good view 1
    inspect("B", 1, good)
    inspect("B", 2, bad)
    inspect("C", 1, good)
    # then after the timeout B is closed defective and C unknown, each naming the views it lacks
    b, c = part("B"), part("C")
    assert (b["verdict"], b["complete"], b["closed_by"], b["views_missing"]) == ("defective", False, "timeout", [3])
    assert (c["verdict"], c["complete"], c["closed_by"], c["views_missing"]) == ("unknown", False, "timeout", [2, 3])
    # and each part was published exactly once, through the outbox (empty once acknowledged)
    assert sorted(p["part_id"] for p in line.json_on("part")) == ["A", "B", "C"]
    line.wait_for(lambda: agent.services[0].outbox.depth() == 0, "the outbox to empty")
    assert agent.services[0].metrics().parts == {
        "all_views": 1,
        "timeout": 2,
        "overflow": 0,
        "shutdown": 0,
        "ignored": 0,
        "open": 0,
    }


def test_part_tracker_counts_a_redelivery_once_ignores_unknown_views_and_closes_the_oldest_on_overflow() -> None:
    from datetime import UTC, datetime

    from lineside.agent.mqtt.config import PartsConfig
    from lineside.agent.mqtt.parts import PartTracker
    from lineside.agent.results import InspectionResult, ResultError

    def result(rid: str, part: str, view: int | None, defective: bool | None = False) -> InspectionResult:
        return InspectionResult(
            result_id=rid,
            frame_id=rid,
            source="test",
            part_id=part,
            view=view,
            captured_at=datetime.now(UTC),
            inspected_at=datetime.now(UTC),
            bundle_id="b",
            bundle_version="v",
            providers=[],
            is_defective=defective,
            score=None if defective is None else 0.1,
            error=ResultError(code="decode_failed", message="x") if defective is None else None,
        )

    tracker = PartTracker(PartsConfig(views=2, first_view=0, timeout_s=10, max_open=2), "cell-07")
    # a redelivered result (same id) and a view out of range do not complete a part
    assert tracker.add(result("r1", "P", 0), now=0.0) == []
    assert tracker.add(result("r1", "P", 0), now=1.0) == []
    assert tracker.add(result("r9", "P", 7), now=1.0) == []
    assert tracker.counters["ignored"] == 1
    # a result without a view fills the first free one
    [done] = tracker.add(result("r2", "P", None), now=2.0)
    assert (done.verdict, done.views_seen) == ("good", [0, 1])
    # opening a third part closes the oldest open one as overflow
    tracker.add(result("q1", "Q", 0), now=3.0)
    tracker.add(result("s1", "S", 0, defective=None), now=4.0)
    [oldest] = tracker.add(result("t1", "T", 0), now=5.0)
    assert (oldest.part_id, oldest.closed_by, oldest.views_missing) == ("Q", "overflow", [1])
    # expiry is measured from the last view; shutdown closes the rest
    assert [p.part_id for p in tracker.expire(now=14.5)] == ["S"]
    assert tracker.expire(now=14.5) == []
    [last] = tracker.close_all()
    assert (last.part_id, last.closed_by, last.verdict) == ("T", "shutdown", "unknown")


# -- TLS and MQTT 3.1.1 ----------------------------------------------------------------------------------


def make_ca(folder: Path, name: str) -> tuple[Path, Any, Any]:
    """A throwaway CA: (its PEM file, certificate, key)."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def make_server_cert(folder: Path, ca_cert: Any, ca_key: Any) -> tuple[Path, Path]:
    """A broker certificate for 127.0.0.1 and localhost signed by the CA: (cert file, key file)."""
    import ipaddress
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "broker")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_file, key_file = folder / "broker.pem", folder / "broker.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@pytest.fixture
def tls_broker(tmp_path: Path, mosquitto: Callable) -> tuple[Any, int, Path, Path]:
    """A broker whose main listener is TLS (a throwaway CA), plus a plain listener for the PLC:
    (broker, plain port, the right CA file, a wrong CA file)."""
    import socket

    pki = tmp_path / "pki"
    pki.mkdir()
    ca_file, ca_cert, ca_key = make_ca(pki, "line-ca")
    wrong_ca, _, _ = make_ca(pki, "other-ca")
    cert_file, key_file = make_server_cert(pki, ca_cert, ca_key)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        plain = int(sock.getsockname()[1])
    broker = mosquitto(
        extra_conf=f"cafile {ca_file}\ncertfile {cert_file}\nkeyfile {key_file}\nlistener {plain} 127.0.0.1\n"
    )
    return broker, plain, ca_file, wrong_ca


def test_tls_with_the_right_ca_connects_and_delivers(
    tmp_path: Path, images: Path, tls_broker: tuple[Any, int, Path, Path], plc: Callable, run_agent: Callable
) -> None:
    # given a TLS broker (host name checked: the certificate names 127.0.0.1) and a PLC on its plain listener
    broker, plain, ca_file, _ = tls_broker
    line = plc(plain, PREFIX)

    # when an agent connects with the CA that signed the broker's certificate
    agent = run_agent(
        mqtt_config(tmp_path, images, broker.port, source={"max_frames": 4}, tls={"ca_file": str(ca_file)})
    )

    # then it goes online and every result arrives, over TLS
    line.wait_for(lambda: len(line.result_ids()) == 4, "4 results over TLS")
    assert line.json_on("status")[0]["state"] == "online"
    assert agent.services[0].link.counters["connects"] >= 1
    assert "mqtt_tls_failed" not in [e["kind"] for e in line.json_on("event")]


def test_tls_with_a_wrong_ca_is_refused_with_a_clear_event_no_crash_and_nothing_lost(
    tmp_path: Path,
    images: Path,
    tls_broker: tuple[Any, int, Path, Path],
    plc: Callable,
    run_agent: Callable,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given a TLS broker and an agent that trusts another CA
    broker, plain, ca_file, wrong_ca = tls_broker
    line = plc(plain, PREFIX)
    config = mqtt_config(tmp_path, images, broker.port, source={"max_frames": 3}, tls={"ca_file": str(wrong_ca)})
    failures: list[Event] = []
    agent = run_agent(config, lambda e: failures.append(e) if e.kind == "mqtt_tls_failed" else None)

    # when it tries to connect, then the handshake failure is reported as an event and logged, naming the cause
    line.wait_for(lambda: len(failures) >= 1, "the TLS failure reported as an event")
    assert "certificate verify failed" in failures[0].message
    assert any("TLS handshake" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    # and the agent keeps running with its results in the outbox, none published
    agent.wait()
    assert agent.status().state == "running"
    assert line.on("result") == [] and line.on("status") == []
    agent.stop()
    assert outbox_depth(tmp_path) >= 3

    # when it restarts with the right CA, then the backlog arrives
    config.mqtt.tls.ca_file = ca_file  # type: ignore[union-attr]
    run_agent(config)
    line.wait_for(lambda: len(line.result_ids()) == 3, "the 3 results once the CA is right")


def test_mqtt_3_1_1_delivers_results_status_and_command_replies(
    tmp_path: Path, images: Path, mosquitto: Callable, plc: Callable, run_agent: Callable
) -> None:
    # given an agent speaking MQTT 3.1.1
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    agent = run_agent(
        mqtt_config(tmp_path, images, broker.port, source={"loop": True, "rate_hz": 10}, protocol="3.1.1")
    )
    assert agent.services[0].link.v5 is False
    online(line)

    # when results flow and the PLC sends a command, then both work as with MQTT 5
    line.wait_for(lambda: len(line.result_ids()) >= 5, "results over 3.1.1")
    line.send("status", b'{"request_id": "s-311"}')
    reply = reply_to(line, "status")
    assert reply["ok"] is True and reply["request_id"] == "s-311"
    # and the broker saw a 3.1.1 client (mosquitto logs its protocol as p2 = 3.1.1, p5 = 5)
    log = (broker.folder / "mosquitto.log").read_text(errors="replace")
    assert "as lineside-cell-07 (p2," in log, log[-2000:]


# -- metrics and outbox eviction -------------------------------------------------------------------------


def test_metrics_are_published_periodically_and_their_counters_move_as_frames_flow(
    tmp_path: Path, images: Path, mosquitto: Callable, plc: Callable, run_agent: Callable
) -> None:
    # given an agent publishing metrics every 0.2 s while frames flow
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    run_agent(mqtt_config(tmp_path, images, broker.port, source={"loop": True, "rate_hz": 20}, metrics_interval_s=0.2))

    # when frames have flowed for a while
    line.wait_for(lambda: len(line.result_ids()) >= 10, "10 results")
    line.wait_for(
        lambda: (
            len(line.json_on("metrics")) >= 2
            and line.json_on("metrics")[-1]["counters"]["results_out"]
            > line.json_on("metrics")[0]["counters"]["results_out"]
        ),
        "metrics whose counters moved",
    )

    # then the counters grow from one message to the next, never back, and latency percentiles are given
    metrics = line.json_on("metrics")
    results_out = [m["counters"]["results_out"] for m in metrics]
    published = [m["mqtt"]["published"] for m in metrics]
    assert results_out == sorted(results_out) and published == sorted(published)
    assert published[-1] > published[0]
    last = metrics[-1]
    assert last["state"] == "running" and last["paused"] is False
    assert last["counters"]["frames_in"] >= last["counters"]["results_out"] > 0
    assert {"p50", "p95"} <= set(last["counters"]["latency_ms"]["total"])
    assert last["outbox"]["evicted"] == 0 and last["mqtt"]["connects"] >= 1


def test_a_full_outbox_evicts_the_oldest_and_every_eviction_is_counted_and_reported_once_connected(
    tmp_path: Path, images: Path, mosquitto: Callable, plc: Callable, run_agent: Callable
) -> None:
    # given a PLC with a persistent session, then the broker down, and an outbox bounded to 10 messages
    broker = mosquitto()
    line = plc(broker.port, PREFIX)
    broker.stop()
    config = mqtt_config(
        tmp_path,
        images,
        broker.port,
        source={"loop": True, "max_frames": 30},
        outbox={"path": str(tmp_path / "outbox.sqlite"), "synchronous": "normal", "max_messages": 10},
    )

    # when 30 results (and a few events) are made during the outage
    agent = run_agent(config)
    agent.wait()
    service = agent.services[0]
    stats = service.outbox.stats()
    # then the outbox kept its bound, and counted what it evicted
    assert stats["depth"] <= 11  # 10, plus at most one eviction report that may go beyond (see Outbox.put)
    evicted = stats["evicted"]
    assert evicted >= 20

    # when the broker comes back
    broker.start()
    expected = jsonl_ids(tmp_path / "results.jsonl")
    assert len(expected) == 30

    # then the evictions are reported as events whose counts add up to every eviction, exactly
    def reported() -> int:
        return sum(e["data"]["count"] for e in line.json_on("event") if e["kind"] == "outbox_evicted")

    line.wait_for(lambda: reported() == service.outbox.stats()["evicted"], "every eviction reported", timeout=90)
    assert service.outbox.stats()["evicted"] == evicted  # nothing more was evicted once connected
    last_report = [e for e in line.json_on("event") if e["kind"] == "outbox_evicted"][-1]
    assert last_report["data"]["total"] == evicted
    # and the results that arrive are the newest, in order: the oldest were evicted, none in between
    line.wait_for(lambda: service.outbox.depth() == 0, "the backlog to drain")
    received = line.result_ids()
    assert 0 < len(received) <= 10
    assert received == expected[-len(received) :]
    assert service.metrics().outbox.evicted == evicted


# -- Sparkplug B ---------------------------------------------------------------------------------------


def sparkplug_decoder() -> Any:
    """The Sparkplug B Payload message built by protobuf itself from sparkplug_b.proto's field numbers
    (an independent decoder: it does not use the agent's encoder)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="spb_test.proto", package="org.eclipse.tahu.protobuf")
    payload = file.message_type.add(name="Payload")
    metric = payload.nested_type.add(name="Metric")
    for name, number, ftype in [
        ("name", 1, f.TYPE_STRING),
        ("alias", 2, f.TYPE_UINT64),
        ("timestamp", 3, f.TYPE_UINT64),
        ("datatype", 4, f.TYPE_UINT32),
        ("is_null", 7, f.TYPE_BOOL),
        ("int_value", 10, f.TYPE_UINT32),
        ("long_value", 11, f.TYPE_UINT64),
        ("float_value", 12, f.TYPE_FLOAT),
        ("double_value", 13, f.TYPE_DOUBLE),
        ("boolean_value", 14, f.TYPE_BOOL),
        ("string_value", 15, f.TYPE_STRING),
    ]:
        metric.field.add(name=name, number=number, type=ftype, label=f.LABEL_OPTIONAL)
    payload.field.add(name="timestamp", number=1, type=f.TYPE_UINT64, label=f.LABEL_OPTIONAL)
    payload.field.add(
        name="metrics",
        number=2,
        type=f.TYPE_MESSAGE,
        label=f.LABEL_REPEATED,
        type_name=".org.eclipse.tahu.protobuf.Payload.Metric",
    )
    payload.field.add(name="seq", number=3, type=f.TYPE_UINT64, label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("org.eclipse.tahu.protobuf.Payload"))


def spb_metrics(decoder: Any, raw: bytes) -> tuple[Any, dict[str, tuple[int, Any]]]:
    """(the decoded payload, metric name -> (datatype, value))."""
    message = decoder.FromString(raw)
    out: dict[str, tuple[int, Any]] = {}
    for m in message.metrics:
        value: Any
        if m.is_null:
            value = None
        elif m.datatype in (1, 2, 3, 5, 6, 7):
            value = m.int_value
        elif m.datatype in (4, 8, 13):
            value = m.long_value
        elif m.datatype == 10:
            value = m.double_value
        elif m.datatype == 11:
            value = m.boolean_value
        else:
            value = m.string_value
        out[m.name] = (m.datatype, value)
    return message, out


def test_sparkplug_b_births_data_commands_rebirth_and_ndeath_decoded_by_an_independent_decoder(
    tmp_path: Path, images: Path, mosquitto: Callable, plc: Callable, run_agent: Callable
) -> None:
    # given an agent with Sparkplug B on (group plant-1, edge node line-3, device = the station cell-07)
    broker = mosquitto()
    host = plc(broker.port, "spBv1.0/plant-1", client_id="scada")
    decoder = sparkplug_decoder()
    agent = run_agent(
        mqtt_config(
            tmp_path,
            images,
            broker.port,
            source={"loop": True, "rate_hz": 10},
            sparkplug={"enabled": True, "group_id": "plant-1", "edge_node_id": "line-3"},
        )
    )

    # then the SCADA sees NBIRTH (bdSeq, Node Control/Rebirth) and DBIRTH with typed metrics
    host.wait_for(lambda: host.on("NBIRTH/line-3") and host.on("DBIRTH/line-3/cell-07"), "NBIRTH and DBIRTH")
    nbirth, node = spb_metrics(decoder, host.on("NBIRTH/line-3")[0])
    assert nbirth.seq == 0 and node["Node Control/Rebirth"] == (11, False)
    bd_seq = node["bdSeq"][1]
    assert node["bdSeq"][0] == 4  # Int64
    dbirth, device = spb_metrics(decoder, host.on("DBIRTH/line-3/cell-07")[0])
    assert dbirth.seq == 1
    types = {name: dtype for name, (dtype, _) in device.items()}
    assert types["Inspection/Verdict"] == 12 and types["Inspection/Score"] == 10  # String, Double
    assert types["Inspection/Box Count"] == 3 and types["Inspection/Part ID"] == 12  # Int32, String
    assert types["Counters/Results Out"] == 4 and types["Counters/Defects"] == 4  # Int64

    # and DDATA per result: verdict, score, box count, counters, seq going on from DBIRTH
    host.wait_for(lambda: len(host.on("DDATA/line-3/cell-07")) >= 3, "3 DDATA")
    ddata = [spb_metrics(decoder, raw) for raw in host.on("DDATA/line-3/cell-07")[:3]]
    assert [d[0].seq for d in ddata] == [2, 3, 4]
    first = ddata[0][1]
    assert first["Inspection/Verdict"][1] in ("good", "defective")
    assert 0.0 <= first["Inspection/Score"][1] <= 1.0 and first["Inspection/Box Count"][1] >= 0
    results_out = [d[1]["Counters/Results Out"][1] for d in ddata]
    assert results_out == sorted(results_out) and results_out[2] > results_out[0]

    # when the SCADA sends DCMD Command/pause (Boolean true) and an invalid Command/trigger
    from lineside.agent.mqtt import spb_proto

    def dcmd(name: str, dtype: spb_proto.DataType, value: Any) -> None:
        payload = spb_proto.Payload(timestamp=1, seq=0, metrics=(spb_proto.Metric(name, dtype, value),))
        host.client.publish("spBv1.0/plant-1/DCMD/line-3/cell-07", spb_proto.encode(payload), qos=1)

    def last_replies() -> list[dict[str, Any]]:
        found = []
        for raw in host.on("DDATA/line-3/cell-07"):
            value = spb_metrics(decoder, raw)[1].get("Command/Last Reply")
            if value is not None:
                found.append(json.loads(value[1]))
        return found

    dcmd("Command/pause", spb_proto.DataType.BOOLEAN, True)
    host.wait_for(lambda: len(last_replies()) >= 1, "the reply to DCMD pause")
    # then the same command ran, with the same reply as on cmd/pause
    assert last_replies()[0]["command"] == "pause" and last_replies()[0]["ok"] is True
    assert agent.status().paused
    dcmd("Command/trigger", spb_proto.DataType.STRING, '{"part_id": "bad id!"}')
    host.wait_for(lambda: len(last_replies()) >= 2, "the reply to DCMD trigger")
    assert last_replies()[1]["ok"] is False and "part_id" in last_replies()[1]["error"]
    assert agent.pipeline.pending_tag() is None
    # and a command metric of the wrong type, or a payload that is not Sparkplug, is refused, changing nothing
    dcmd("Command/resume", spb_proto.DataType.INT32, 5)
    host.wait_for(lambda: len(last_replies()) >= 3, "the reply to a wrong-typed DCMD")
    assert last_replies()[2]["ok"] is False and "expected a String" in last_replies()[2]["error"]
    host.client.publish("spBv1.0/plant-1/DCMD/line-3/cell-07", b"\xff\xff\xff", qos=1)
    host.wait_for(lambda: len(last_replies()) >= 4, "the reply to an undecodable DCMD")
    assert last_replies()[3]["ok"] is False and "undecodable" in last_replies()[3]["error"]
    assert agent.status().paused

    # when the SCADA asks for a rebirth, then NBIRTH and DBIRTH come again with the same bdSeq
    rebirth = spb_proto.Payload(
        timestamp=1, seq=0, metrics=(spb_proto.Metric("Node Control/Rebirth", spb_proto.DataType.BOOLEAN, True),)
    )
    host.client.publish("spBv1.0/plant-1/NCMD/line-3", spb_proto.encode(rebirth), qos=1)
    host.wait_for(lambda: len(host.on("NBIRTH/line-3")) >= 2, "the second NBIRTH")
    assert spb_metrics(decoder, host.on("NBIRTH/line-3")[1])[1]["bdSeq"][1] == bd_seq
    host.wait_for(lambda: len(host.on("DBIRTH/line-3/cell-07")) >= 2, "the second DBIRTH")

    # and the will registered for this connection is NDEATH with the same bdSeq
    node_client = agent.services[0].sparkplug.client
    assert node_client._will_topic.decode() == "spBv1.0/plant-1/NDEATH/line-3"
    assert spb_metrics(decoder, node_client._will_payload)[1]["bdSeq"][1] == bd_seq

    # when the agent stops cleanly, then NDEATH carries the bdSeq of the NBIRTH
    agent.stop()
    host.wait_for(lambda: host.on("NDEATH/line-3"), "NDEATH")
    ndeath, death = spb_metrics(decoder, host.on("NDEATH/line-3")[0])
    assert death["bdSeq"] == (4, bd_seq)
    assert not ndeath.HasField("seq")
