"""Remote model updates end to end: real bundles published by `lineside-export publish` to a real S3 API
(moto server over HTTP), agents running in-process with the real engine, frames flowing from a replay source.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from lineside.agent.config import parse_config
from lineside.agent.errors import ConfigError
from lineside.agent.events import Event
from lineside.agent.results import InspectionResult
from lineside.agent.runtime import Agent
from lineside.agent.s3.signing import ChannelPointer, generate_keypair, load_private_key, sign_pointer
from lineside.agent.s3.updates import UpdatesService
from lineside.agent.sinks.base import Sink

PREFIX = "plant"


# -- bundles ---------------------------------------------------------------------------------------


def make_variant(source: Path, target: Path, bundle_id: str, version: str) -> Path:
    """A copy of `source` that is another bundle: new id and version in its manifest (files unchanged)."""
    shutil.copytree(source, target)
    edit_manifest(target, lambda m: m.update(bundle_id=bundle_id, version=version))
    return target


def edit_manifest(folder: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2) + "\n")


@pytest.fixture(scope="module")
def bundles(test_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1 (what bundle.path serves), v2 and v3 (good updates), and bad ones that break one thing each."""
    import hashlib

    root = tmp_path_factory.mktemp("bundles")
    made = {
        name: make_variant(test_bundle, root / name, f"bundle-{name}", f"2026.12.0{i}-1")
        for i, name in enumerate(["v1", "v2", "v3", "onnx_broken", "golden_wrong", "tampered"], start=1)
    }

    # an ONNX file that does not load, its sha256 updated so only the load can fail
    broken = made["onnx_broken"] / "classifier.onnx"
    broken.write_bytes(b"this is not an ONNX graph" * 100)
    digest = hashlib.sha256(broken.read_bytes()).hexdigest()
    edit_manifest(made["onnx_broken"], lambda m: m["models"]["classifier"]["file"].update(sha256=digest))

    # golden outputs that disagree with what the models say
    def shift_scores(m: dict[str, Any]) -> None:
        for golden in m["golden"]:
            golden["expected_scores"] = {k: v + 0.3 for k, v in golden["expected_scores"].items()}

    edit_manifest(made["golden_wrong"], shift_scores)

    # a golden image changed after the manifest was written (its sha256 no longer matches)
    golden = next((made["tampered"] / "golden").iterdir())
    golden.write_bytes(golden.read_bytes() + b"\0")
    return made


def version_of(folder: Path) -> str:
    return str(json.loads((folder / "manifest.json").read_text())["version"])


@pytest.fixture(scope="module")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    private, public = generate_keypair(root / "ours")
    other_private, _ = generate_keypair(root / "other")
    return {"private": private, "public": public, "other": other_private}


@pytest.fixture
def frames(test_bundle: Path, tmp_path: Path) -> Path:
    """Real radiographs for the replay source: the bundle's golden images."""
    folder = tmp_path / "frames"
    shutil.copytree(test_bundle / "golden", folder)
    return folder


# -- S3 ----------------------------------------------------------------------------------------------


class Bucket:
    """A fresh bucket on the moto server; publishes through the real `publish` of the export stage."""

    def __init__(self, endpoint: str, keys: dict[str, Path]) -> None:
        self.endpoint = endpoint
        self.keys = keys
        self.name = f"updates-{uuid.uuid4().hex[:12]}"
        self.client = boto3.client("s3", endpoint_url=endpoint)
        self.client.create_bucket(Bucket=self.name)

    def publish(self, bundle: Path, channel: str = "stable", *, sign: bool = True) -> ChannelPointer:
        from lineside.export.publish import publish

        key = self.keys["private"] if sign else None
        return publish(bundle, f"s3://{self.name}/{PREFIX}", channel, sign=key, endpoint_url=self.endpoint)

    def pointer(self, channel: str = "stable") -> ChannelPointer:
        body = self.client.get_object(Bucket=self.name, Key=f"{PREFIX}/models/{channel}/latest.json")["Body"]
        return ChannelPointer.model_validate_json(body.read())

    def put_pointer(self, body: bytes | ChannelPointer, channel: str = "stable") -> None:
        data = body.model_dump_json().encode() if isinstance(body, ChannelPointer) else body
        self.client.put_object(Bucket=self.name, Key=f"{PREFIX}/models/{channel}/latest.json", Body=data)


@pytest.fixture
def bucket(s3_endpoint: str, signing_keys: dict[str, Path]) -> Bucket:
    return Bucket(s3_endpoint, signing_keys)


# -- agents ------------------------------------------------------------------------------------------


class RunningAgent:
    """An in-process agent with the registered services, its results and its events."""

    def __init__(self, agent: Agent, results: list[InspectionResult], events: list[Event]) -> None:
        self.agent = agent
        self.results = results
        self.events = events
        # kept: agent.services is emptied by stop()
        self.updates: UpdatesService = next(s for s in agent.services if isinstance(s, UpdatesService))

    @property
    def version(self) -> str | None:
        return self.agent.status().bundle_version

    def poll(self) -> str:
        return self.updates.poll_once()

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def wait_results(self, more: int = 2) -> None:
        """Wait until `more` further results arrived (the pipeline is alive and serving)."""
        target = len(self.results) + more
        self.wait_for(lambda: len(self.results) >= target, f"{more} more results")


@pytest.fixture
def start_agent(
    bundles: dict[str, Path],
    frames: Path,
    tmp_path: Path,
    signing_keys: dict[str, Path],
    make_sink: Callable[[], Sink],
) -> Iterator[Callable[..., RunningAgent]]:
    started: list[Agent] = []

    def start(
        bucket: Bucket,
        *,
        station: str = "cell-1",
        channel: str = "stable",
        signed: bool = True,
        rate_hz: float = 5.0,
        s3: dict[str, Any] | None = None,
        mqtt: dict[str, Any] | None = None,
        bundle_path: Path | None = None,
        **updates: Any,
    ) -> RunningAgent:
        config = {
            "station": station,
            "bundle": {"path": str(bundle_path or bundles["v1"])},
            "inference": {"providers": ["cpu"]},
            "source": {"kind": "replay", "path": str(frames), "loop": True, "rate_hz": rate_hz},
            "status_log": {"interval_s": 0},
            "health": {"enabled": False},
            "notify": {"enabled": False},
            "s3": {
                "bucket": bucket.name,
                "prefix": PREFIX,
                "endpoint_url": bucket.endpoint,
                "connect_timeout_s": 1,
                "read_timeout_s": 5,
                **(s3 or {}),
            },
            "updates": {
                "channel": channel,
                "poll_seconds": 3600,  # the tests poll themselves (poll_once), except where the loop is the point
                "bundles_dir": str(tmp_path / f"bundles-{station}"),
                "min_free_mb": 0,
                **({"public_key": str(signing_keys["public"])} if signed else {}),
                **updates,
            },
        }
        if mqtt is not None:
            config["mqtt"] = mqtt
        sink = make_sink()
        events: list[Event] = []
        agent = Agent(parse_config(config), sinks=[sink])
        agent.events.subscribe(events.append)
        started.append(agent)
        agent.start()
        running = RunningAgent(agent, sink.results, events)
        # the service's first poll runs at start; let it finish so each test's own polls are deterministic
        running.wait_for(lambda: running.updates.counters()["polls"] >= 1, "the first poll")
        return running

    yield start
    for agent in started:
        agent.stop()


def staging_is_empty(running: RunningAgent) -> bool:
    staging = running.updates.store.staging_dir
    return not staging.exists() or not any(staging.iterdir())


# -- the good path -----------------------------------------------------------------------------------


def test_a_good_update_swaps_in_while_frames_flow_without_losing_a_frame(
    bucket: Bucket, start_agent: Callable[..., RunningAgent], bundles: dict[str, Path], frames: Path
) -> None:
    # given an agent serving v1 with frames flowing, polling every second
    running = start_agent(bucket, rate_hz=20, poll_seconds=1)
    running.wait_results(5)
    assert running.version == version_of(bundles["v1"])

    # when v2 is published, signed, to its channel
    bucket.publish(bundles["v2"])

    # then the polling loop picks it up and swaps it in while frames keep flowing
    v2 = version_of(bundles["v2"])
    running.wait_for(lambda: running.version == v2, "the swap to v2")
    running.wait_results(5)
    drops = running.agent.status().counters["drops_by_reason"]  # before the stop (it releases queued frames)
    running.agent.stop()

    # no frame dropped or lost: the replayed frames come out in order without a gap, none an error
    names = sorted(p.name for p in frames.iterdir())
    expected = [f"{i // len(names)}:{names[i % len(names)]}" for i in range(len(running.results))]
    assert [r.frame_id for r in running.results] == expected
    assert drops == {}
    assert all(r.error is None for r in running.results)
    # every result names its bundle, and the version switches exactly once: v1 ... v1, v2 ... v2
    versions = [r.bundle_version for r in running.results]
    switches = [i for i in range(1, len(versions)) if versions[i] != versions[i - 1]]
    assert versions[0] == version_of(bundles["v1"]) and versions[-1] == v2
    assert len(switches) == 1, versions
    assert {r.bundle_id for r in running.results[switches[0] :]} == {"bundle-v2"}
    # reported, counted, recorded for the next start, nothing left in staging
    assert [e.data["version"] for e in running.of_kind("update_available")] == [v2]
    assert [e.data["version"] for e in running.of_kind("bundle_changed")] == [v2]
    assert running.of_kind("bundle_activated")[0].data["previous_version"] == version_of(bundles["v1"])
    counters = running.updates.counters()
    assert (counters["downloads"], counters["activated"], counters["rejected"]) == (1, 1, 0)
    active = json.loads((running.updates.store.root / "active.json").read_text())
    assert (active["bundle_id"], active["history"]) == ("bundle-v2", ["bundle-v1"])
    assert staging_is_empty(running)


# -- bad updates: each refused, the running bundle keeps serving -----------------------------------------


def _tamper_pointer(bucket: Bucket, keys: dict[str, Path], **change: Any) -> None:
    """Re-sign the stable pointer with `change` applied (a pointer that lies about the archive)."""
    pointer = bucket.pointer().model_copy(update=change)
    bucket.put_pointer(sign_pointer(pointer, load_private_key(keys["private"])))


def _truncate_archive(bucket: Bucket) -> None:
    pointer = bucket.pointer()
    data = bucket.client.get_object(Bucket=bucket.name, Key=pointer.key)["Body"].read()
    bucket.client.put_object(Bucket=bucket.name, Key=pointer.key, Body=data[: len(data) // 2])


BAD_UPDATES: dict[str, tuple[Callable[[Bucket, dict[str, Path], dict[str, Path]], None], str, str]] = {
    # name: (what the test does after publishing nothing, the step, words of the reason)
    "pointer_not_json": (lambda b, bs, k: b.put_pointer(b"{this is not json"), "pointer", "is not JSON"),
    "pointer_of_another_channel": (
        lambda b, bs, k: b.put_pointer(b.publish(bs["v2"], "canary").model_dump_json().encode()),
        "pointer",
        "published to channel 'canary'",
    ),
    "pointer_to_a_missing_bundle": (
        lambda b, bs, k: (b.publish(bs["v2"]), _tamper_pointer(b, k, key=f"{PREFIX}/models/bundles/gone.tar.gz")),
        "download",
        "does not exist",
    ),
    "truncated_archive": (lambda b, bs, k: (b.publish(bs["v2"]), _truncate_archive(b)), "download", "truncated"),
    "wrong_sha256": (
        lambda b, bs, k: (b.publish(bs["v2"]), _tamper_pointer(b, k, sha256="0" * 64)),
        "download",
        "sha256",
    ),
    "bad_signature": (
        lambda b, bs, k: (b.publish(bs["v2"]), b.put_pointer(b.pointer().model_copy(update={"version": "9999"}))),
        "signature",
        "does not match",
    ),
    "signed_by_another_key": (
        lambda b, bs, k: (
            b.publish(bs["v2"]),
            b.put_pointer(sign_pointer(b.pointer(), load_private_key(k["other"]))),
        ),
        "signature",
        "signed by key",
    ),
    "unsigned": (lambda b, bs, k: b.publish(bs["v2"], sign=False), "signature", "unsigned"),
    "tampered_file": (lambda b, bs, k: _publish_unverified(b, bs["tampered"]), "verify", "sha256"),
    "onnx_that_does_not_load": (lambda b, bs, k: b.publish(bs["onnx_broken"]), "prove", "cannot load"),
    "golden_outputs_disagree": (lambda b, bs, k: b.publish(bs["golden_wrong"]), "prove", "golden-image check failed"),
}


def _publish_unverified(bucket: Bucket, folder: Path) -> None:
    """What a broken publisher would do: pack and point without verifying (publish itself refuses this)."""
    import hashlib
    import io
    import tarfile
    from datetime import UTC, datetime

    manifest = json.loads((folder / "manifest.json").read_text())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname=manifest["bundle_id"])
    data = buffer.getvalue()
    key = f"{PREFIX}/models/bundles/{manifest['bundle_id']}/{manifest['bundle_id']}.tar.gz"
    bucket.client.put_object(Bucket=bucket.name, Key=key, Body=data)
    pointer = ChannelPointer(
        channel="stable",
        bundle_id=manifest["bundle_id"],
        version=manifest["version"],
        key=key,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        published_at=datetime.now(UTC),
    )
    bucket.put_pointer(sign_pointer(pointer, load_private_key(bucket.keys["private"])))


@pytest.mark.parametrize("case", sorted(BAD_UPDATES))
def test_a_bad_update_is_rejected_once_and_the_running_bundle_keeps_serving(
    case: str,
    bucket: Bucket,
    start_agent: Callable[..., RunningAgent],
    bundles: dict[str, Path],
    signing_keys: dict[str, Path],
) -> None:
    # given an agent serving v1
    running = start_agent(bucket)
    v1 = version_of(bundles["v1"])
    setup, step, words = BAD_UPDATES[case]

    # when the channel offers a bad bundle
    setup(bucket, bundles, signing_keys)
    outcome = running.poll()

    # then it is rejected at the step that failed, with a reason, and v1 still serves frames
    assert outcome == "rejected"
    [event] = running.of_kind("update_rejected")
    assert event.data["step"] == step, event.message
    assert words in event.data["reason"], event.data["reason"]
    assert running.version == v1
    running.wait_results(2)
    assert running.results[-1].bundle_version == v1
    assert running.of_kind("bundle_changed") == []
    assert staging_is_empty(running)
    assert sorted(p.name for p in running.updates.store.store_dir.iterdir()) == ["bundle-v1"]  # nothing bad kept
    # and the same pointer is not downloaded again at the next poll
    downloads = running.updates.counters()["downloads"]
    assert running.poll() == "unchanged"
    assert running.updates.counters()["downloads"] == downloads
    assert len(running.of_kind("update_rejected")) == 1


def test_a_bundle_over_max_bundle_mb_is_refused_before_any_download(
    bucket: Bucket, start_agent: Callable[..., RunningAgent], bundles: dict[str, Path]
) -> None:
    running = start_agent(bucket, max_bundle_mb=1)
    bucket.publish(bundles["v2"])  # ~8 MB archive

    assert running.poll() == "rejected"
    [event] = running.of_kind("update_rejected")
    assert event.data["step"] == "space" and "max_bundle_mb" in event.data["reason"]
    assert running.updates.counters()["downloads"] == 0
    assert running.version == version_of(bundles["v1"])


def test_too_little_free_disk_is_refused_before_downloading_and_retried_later(
    bucket: Bucket, start_agent: Callable[..., RunningAgent], bundles: dict[str, Path]
) -> None:
    # given an agent that must keep a petabyte free (the real free-space figure of its disk is checked)
    running = start_agent(bucket, min_free_mb=1_000_000_000)
    bucket.publish(bundles["v2"])

    # when / then: refused before downloading, as a failure to retry (disk may be freed without a new pointer)
    assert running.poll() == "failed"
    [event] = running.of_kind("update_failed")
    assert event.data["step"] == "space" and "MB free in" in event.data["reason"]
    assert running.updates.counters()["downloads"] == 0
    assert running.poll() == "failed"  # retried, not remembered as rejected
    assert len(running.of_kind("update_failed")) == 1  # one event per outage
    assert running.version == version_of(bundles["v1"])


def test_a_bucket_that_does_not_exist_is_reported_and_retried(
    bucket: Bucket, start_agent: Callable[..., RunningAgent], bundles: dict[str, Path]
) -> None:
    running = start_agent(bucket, s3={"bucket": "no-such-bucket-here"}, backoff_max_s=86400)
    # the first poll at start already failed
    [event] = running.of_kind("update_failed")
    assert event.data["step"] == "poll" and "NoSuchBucket" in event.data["reason"]
    assert running.poll() == "failed"
    assert running.updates._next_wait() == 2 * 3600  # backoff doubles from poll_seconds
    assert running.version == version_of(bundles["v1"])
    running.wait_results(2)


def test_access_denied_is_reported_and_retried(
    bucket: Bucket, start_agent: Callable[..., RunningAgent], bundles: dict[str, Path]
) -> None:
    # given a pointer the bucket policy forbids reading
    bucket.publish(bundles["v2"])
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Deny", "Principal": "*", "Action": "s3:GetObject", "Resource": f"arn:aws:s3:::{bucket.name}/*"}
        ],
    }
    bucket.client.put_bucket_policy(Bucket=bucket.name, Policy=json.dumps(policy))
    running = start_agent(bucket)

    # then the start's poll failed with the 403, and v1 serves
    [event] = running.of_kind("update_failed")
    assert event.data["step"] == "poll" and "403" in event.data["reason"]
    assert running.version == version_of(bundles["v1"])

    # when access is granted again, the next poll takes the update
    bucket.client.delete_bucket_policy(Bucket=bucket.name)
    assert running.poll() == "activated"
    assert running.version == version_of(bundles["v2"])


def test_an_unreachable_store_is_retried_and_the_update_lands_when_it_is_back(
    start_agent: Callable[..., RunningAgent],
    bundles: dict[str, Path],
    signing_keys: dict[str, Path],
    s3_endpoint: str,  # for its test credentials; this test runs an endpoint of its own
) -> None:
    from moto.server import ThreadedMotoServer

    # given an S3 endpoint of our own with v2 published, then stopped
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    bucket = Bucket(f"http://{host}:{port}", signing_keys)
    bucket.publish(bundles["v2"])
    server.stop()
    try:
        # when the agent polls
        running = start_agent(bucket)

        # then the failure is reported once and v1 keeps serving
        [event] = running.of_kind("update_failed")
        assert event.data["step"] == "poll" and "connect" in event.data["reason"].lower()
        assert running.poll() == "failed"
        assert len(running.of_kind("update_failed")) == 1
        running.wait_results(2)
        assert running.version == version_of(bundles["v1"])

        # when the endpoint is back (moto keeps its buckets per process), the next poll swaps
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        assert running.poll() == "activated"
        assert running.version == version_of(bundles["v2"])
        assert running.updates._next_wait() == 3600  # backoff reset
    finally:
        server.stop()


# -- rollback, restart ---------------------------------------------------------------------------------


def test_rollback_by_mqtt_command_holds_across_restarts(
    bucket: Bucket,
    start_agent: Callable[..., RunningAgent],
    bundles: dict[str, Path],
    mosquitto: Callable[..., Any],
    plc: Callable[..., Any],
    tmp_path: Path,
) -> None:
    broker = mosquitto()
    mqtt = {
        "port": broker.port,
        "topic_prefix": "lineside/cell-1",
        "outbox": {"path": str(tmp_path / "outbox.sqlite"), "synchronous": "normal"},
        "metrics_interval_s": 0,
        "state_dir": str(tmp_path / "state"),
    }
    line = plc(broker.port, "lineside/cell-1")
    v1, v2 = version_of(bundles["v1"]), version_of(bundles["v2"])

    # given an agent that took v2 from the channel, then stopped
    first = start_agent(bucket, mqtt=mqtt)
    bucket.publish(bundles["v2"])
    assert first.poll() == "activated"
    first.agent.stop()

    # when it starts again, it serves v2 (the activated bundle), not bundle.path (v1)
    second = start_agent(bucket, mqtt=mqtt)
    assert second.version == v2
    assert second.poll() == "unchanged"

    # when the PLC asks for v1 back
    line.send("activate-bundle", json.dumps({"version": v1, "request_id": "r-1"}))
    line.wait_for(lambda: line.json_on("cmd/activate-bundle/reply"), "the reply")
    [reply] = line.json_on("cmd/activate-bundle/reply")

    # then v1 serves, proven and swapped, and the channel (still on v2) does not undo it
    assert reply["ok"] and reply["request_id"] == "r-1", reply
    assert (reply["result"]["version"], reply["result"]["previous_version"]) == (v1, v2)
    assert second.version == v1
    second.wait_results(2)
    assert second.results[-1].bundle_version == v1
    assert second.of_kind("bundle_activated")[-1].data["how"] == "command"
    assert second.poll() == "unchanged"
    assert second.version == v1

    # and a bundle that is not kept is refused with the reason
    line.send("activate-bundle", json.dumps({"version": "0000.00.00-0", "request_id": "r-2"}))
    line.wait_for(lambda: len(line.json_on("cmd/activate-bundle/reply")) == 2, "the second reply")
    refused = line.json_on("cmd/activate-bundle/reply")[1]
    assert not refused["ok"] and "no kept bundle" in refused["error"] and v2 in refused["error"]
    second.agent.stop()

    # and after another restart v1 still serves, and the unchanged channel does not bring v2 back
    third = start_agent(bucket, mqtt=mqtt)
    assert third.version == v1
    assert third.updates.counters()["downloads"] == 0
    assert third.poll() == "unchanged"
    assert third.version == v1


def test_an_activated_bundle_damaged_on_disk_falls_back_to_bundle_path_at_start(
    bucket: Bucket, start_agent: Callable[..., RunningAgent], bundles: dict[str, Path]
) -> None:
    # given v2 activated, then one of its files damaged on disk while the agent was down
    first = start_agent(bucket)
    bucket.publish(bundles["v2"])
    assert first.poll() == "activated"
    first.agent.stop()
    model = first.updates.store.path_of("bundle-v2") / "ssd.onnx"
    model.write_bytes(model.read_bytes()[:-10])

    # when it starts again
    second = start_agent(bucket)

    # then bundle.path (v1) serves and the fallback is reported once services listen
    assert second.version == version_of(bundles["v1"])
    [event] = second.of_kind("bundle_fallback")
    assert event.data["bundle_id"] == "bundle-v2" and "ssd.onnx" in event.data["reason"]
    second.wait_results(2)


def test_a_bundle_path_changed_by_hand_wins_over_the_activated_bundle(
    bucket: Bucket, start_agent: Callable[..., RunningAgent], bundles: dict[str, Path]
) -> None:
    # given v2 activated from the channel while bundle.path held v1
    first = start_agent(bucket)
    bucket.publish(bundles["v2"])
    assert first.poll() == "activated"
    first.agent.stop()

    # when it restarts unchanged, v2 serves; when someone deploys v3 at bundle.path by hand, v3 serves
    again = start_agent(bucket)
    assert again.version == version_of(bundles["v2"])
    again.agent.stop()
    by_hand = start_agent(bucket, bundle_path=bundles["v3"])
    assert by_hand.version == version_of(bundles["v3"])
    active = json.loads((by_hand.updates.store.root / "active.json").read_text())
    assert (active["bundle_id"], active["how"], active["configured_bundle_id"]) == ("bundle-v3", "adopted", "bundle-v3")
    # and the channel's unchanged pointer (v2) does not take it back
    assert by_hand.poll() == "unchanged"


def test_keep_bounds_the_bundles_on_disk_and_an_unknown_rollback_names_what_is_kept(
    bucket: Bucket, start_agent: Callable[..., RunningAgent], bundles: dict[str, Path]
) -> None:
    # given keep: 1 and three bundles in a row
    running = start_agent(bucket, keep=1)
    for name in ("v2", "v3"):
        bucket.publish(bundles[name])
        assert running.poll() == "activated"

    # then the active one and one before it are kept; the oldest is gone
    kept = sorted(p.name for p in running.updates.store.store_dir.iterdir())
    assert kept == ["bundle-v2", "bundle-v3"]
    with pytest.raises(ValueError, match="no kept bundle"):
        running.agent.activate_bundle(version=version_of(bundles["v1"]))
    assert running.agent.activate_bundle(bundle_id="bundle-v2")["version"] == version_of(bundles["v2"])


def test_without_auto_activate_a_proven_bundle_waits_for_the_command(
    bucket: Bucket, start_agent: Callable[..., RunningAgent], bundles: dict[str, Path]
) -> None:
    running = start_agent(bucket, auto_activate=False)
    bucket.publish(bundles["v2"])

    assert running.poll() == "ready"
    assert [e.data["version"] for e in running.of_kind("update_ready")] == [version_of(bundles["v2"])]
    assert running.version == version_of(bundles["v1"])
    assert running.poll() == "unchanged"

    result = running.agent.activate_bundle(version=version_of(bundles["v2"]))
    assert result["changed"] and running.version == version_of(bundles["v2"])


# -- channels ----------------------------------------------------------------------------------------------


def test_canary_first_then_stable(
    bucket: Bucket, start_agent: Callable[..., RunningAgent], bundles: dict[str, Path]
) -> None:
    # given two stations, one on canary, one on stable
    canary = start_agent(bucket, station="cell-1", channel="canary")
    stable = start_agent(bucket, station="cell-2", channel="stable")
    v1, v2 = version_of(bundles["v1"]), version_of(bundles["v2"])

    # when v2 goes to canary, only the canary station swaps
    bucket.publish(bundles["v2"], "canary")
    assert (canary.poll(), stable.poll()) == ("activated", "empty")
    assert (canary.version, stable.version) == (v2, v1)

    # when it is promoted to stable, the other station follows
    bucket.publish(bundles["v2"], "stable")
    assert (canary.poll(), stable.poll()) == ("unchanged", "activated")
    assert (canary.version, stable.version) == (v2, v2)
    for running in (canary, stable):
        running.wait_results(2)
        assert running.results[-1].bundle_version == v2


# -- config ------------------------------------------------------------------------------------------------


def test_updates_without_an_s3_section_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    base = {"station": "s", "bundle": {"path": str(tmp_path)}, "source": {"kind": "replay", "path": str(tmp_path)}}
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "updates": {"channel": "stable"}})
    assert any(p.startswith("updates:") and "s3" in p for p in err.value.problems), err.value.problems
    # switched off, it needs nothing
    assert parse_config({**base, "updates": {"enabled": False}}).updates is not None
    # unknown keys and bad channel names are refused with their key path
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "s3": {"bucket": "abc"}, "updates": {"chanel": "x", "channel": "Stable"}})
    assert sorted(p.split(":")[0] for p in err.value.problems) == ["updates.chanel", "updates.channel"]


def test_check_config_names_a_missing_or_unreadable_public_key(tmp_path: Path) -> None:
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("not a key")
    base = {
        "station": "s",
        "bundle": {"path": str(tmp_path)},
        "source": {"kind": "replay", "path": str(tmp_path)},
        "s3": {"bucket": "abc"},
    }
    missing = parse_config(
        {**base, "updates": {"public_key": str(tmp_path / "nope.pub"), "bundles_dir": str(tmp_path)}}
    )
    assert any(p.startswith("updates.public_key:") and "does not exist" in p for p in missing.problems())
    unreadable = parse_config({**base, "updates": {"public_key": str(bad_key), "bundles_dir": str(tmp_path)}})
    assert any(p.startswith("updates.public_key:") and "PEM" in p for p in unreadable.problems())


def test_a_stop_during_polling_ends_the_updates_thread(
    bucket: Bucket, start_agent: Callable[..., RunningAgent]
) -> None:
    running = start_agent(bucket, poll_seconds=1)
    running.agent.stop()
    assert not [t for t in threading.enumerate() if t.name == "lineside-updates" and t.is_alive()]
