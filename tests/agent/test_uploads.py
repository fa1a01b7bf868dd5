"""Flagged uploads against a real S3 API (moto's server over HTTP on loopback), agents run in-process.

Outages are real: the server is stopped and started again on the same port (moto keeps its state per
process, so the bucket and its objects survive). Nothing in boto3 is patched.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from lineside.agent.config import AgentConfig, parse_config
from lineside.agent.errors import ConfigError
from lineside.agent.events import Event
from lineside.agent.inference.types import Detection, Prediction
from lineside.agent.results import InspectionResult, ResultBox, ResultError
from lineside.agent.runtime import Agent
from lineside.agent.s3.uploads import UploadsService, flag_reason, sample_unit

# -- a real S3 endpoint that can go down and come back --------------------------------------------


class S3Endpoint:
    """moto's threaded server on a fixed loopback port: `stop()` is an outage, `start()` the recovery."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.server: Any = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Endpoint]:
    """A running endpoint with test credentials in the environment (boto3's chain, no shared files)."""
    from lineside.agent.storage import reset_s3_client

    endpoint = S3Endpoint()
    for name, value in {
        "AWS_ENDPOINT_URL": endpoint.url,  # the export reader's client
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "NO_PROXY": "127.0.0.1,localhost",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    reset_s3_client()
    endpoint.start()
    try:
        yield endpoint
    finally:
        endpoint.stop()
        reset_s3_client()


_buckets = iter(range(1_000_000))


def new_bucket(s3: S3Endpoint, *, versioned: bool = True, create: bool = True) -> str:
    """A bucket of its own (moto's state is shared by the process); versioned, so a rewrite would show."""
    name = f"uploads-{os.getpid()}-{next(_buckets)}"
    if create:
        client = s3.client()
        client.create_bucket(Bucket=name)
        if versioned:
            client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


# -- frames with known verdicts -------------------------------------------------------------------


@dataclass
class ScoreInspector:
    """Scores an image by its mean brightness (0-1) with the real contract: defective iff score >= 0.5;
    a defective image gets one box. Stands in for the engine (no bundle needed)."""

    providers_in_use: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    manifest: Any = None

    def __post_init__(self) -> None:
        from types import SimpleNamespace

        self.manifest = SimpleNamespace(bundle_id="test-bundle", version="2026.01.01-1")

    def close(self) -> None:
        return None

    def predict(self, image: np.ndarray, bits_stored: int | None = None) -> Prediction:
        score = float(image.mean()) / float(np.iinfo(image.dtype).max)
        defective = score >= 0.5
        boxes = (Detection(x1=5.0, y1=6.0, x2=25.0, y2=20.0, score=0.87, source="ssd"),) if defective else ()
        return Prediction(
            is_defective=defective,
            score=score,
            boxes=boxes,
            model_scores={"ssd": score},
            fired=("ssd",) if defective else (),
            timings_ms={"preprocess": 0.1},
        )


def noise_png(
    path: Path, mean: float, *, dtype: type = np.uint8, size: tuple[int, int] = (48, 64), seed: int = 0
) -> Path:
    """A PNG whose brightness averages `mean` (0-1) with noise, so files differ and do not compress away."""
    top = np.iinfo(dtype).max
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(mean * top, 0.02 * top, size), 0, top).astype(dtype)
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    path.write_bytes(encoded.tobytes())
    return path


DEFECTIVE, UNCERTAIN, NORMAL = 0.8, 0.45, 0.1


@pytest.fixture
def frames(tmp_path: Path) -> dict[str, Any]:
    """Replay folder: 3 defective, 2 uncertain, 3 clear normals (8-bit), a 16-bit defective, a broken file."""
    folder = tmp_path / "frames"
    folder.mkdir()
    expect: dict[str, str | None] = {}
    for i in range(3):
        noise_png(folder / f"a_defective_{i}.png", DEFECTIVE, seed=i)
        expect[f"a_defective_{i}.png"] = "defective"
    for i in range(2):
        noise_png(folder / f"b_uncertain_{i}.png", UNCERTAIN, seed=10 + i)
        expect[f"b_uncertain_{i}.png"] = "uncertain"
    for i in range(3):
        noise_png(folder / f"c_normal_{i}.png", NORMAL, seed=20 + i)
        expect[f"c_normal_{i}.png"] = None
    noise_png(folder / "d_deep16.png", DEFECTIVE, dtype=np.uint16, seed=30)
    expect["d_deep16.png"] = "defective"
    (folder / "e_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    expect["e_broken.png"] = None  # an error result: never uploaded
    return {"folder": folder, "expect": expect}


def config_for(
    folder: Path,
    queue_dir: Path,
    bucket: str,
    endpoint: str,
    *,
    uploads: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> AgentConfig:
    return parse_config(
        {
            "station": "cell-1",
            "bundle": {"path": str(folder)},
            "source": source or {"kind": "replay", "path": str(folder)},
            "sinks": [],
            "status_log": {"interval_s": 0},
            "notify": {"enabled": False},
            "health": {"port": 0},
            "s3": {"bucket": bucket, "prefix": "flagged", "endpoint_url": endpoint, "connect_timeout_s": 1},
            "uploads": {
                "queue_dir": str(queue_dir),
                "normal_sample_rate": 0,
                "backoff_min_s": 0.05,
                "backoff_max_s": 0.3,
                **(uploads or {}),
            },
        }
    )


class Run:
    """An in-process agent with its events recorded."""

    def __init__(self, config: AgentConfig) -> None:
        self.events: list[Event] = []
        self.agent = Agent(config, engine_loader=lambda c: ScoreInspector())  # type: ignore[arg-type,return-value]
        self.agent.events.subscribe(self.events.append)
        self.agent.start()
        self.uploads = next(s for s in self.agent.services if isinstance(s, UploadsService))

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def wait_finished(self) -> None:
        wait_until(lambda: self.agent.pipeline is not None and self.agent.pipeline.finished)

    def results(self) -> int:
        return int(self.agent.status().counters.get("results_out", 0))


@pytest.fixture
def runs() -> Iterator[Callable[[AgentConfig], Run]]:
    started: list[Run] = []

    def start(config: AgentConfig) -> Run:
        started.append(Run(config))
        return started[-1]

    yield start
    for run in started:
        run.agent.stop()


def wait_until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def all_versions(s3: S3Endpoint, bucket: str) -> dict[str, int]:
    """key -> number of versions (a retry that rewrote an object would show 2)."""
    counts: dict[str, int] = {}
    for page in s3.client().get_paginator("list_object_versions").paginate(Bucket=bucket):
        for version in page.get("Versions", []):
            counts[version["Key"]] = counts.get(version["Key"], 0) + 1
    return counts


def flagged_names(expect: dict[str, str | None]) -> set[str]:
    return {name for name, reason in expect.items() if reason is not None}


# -- the promises ---------------------------------------------------------------------------------


def test_an_outage_loses_nothing_and_duplicates_nothing(
    s3: S3Endpoint,
    frames: dict[str, Any],
    tmp_path: Path,
    runs: Callable[[AgentConfig], Run],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from lineside.export.data import open_dataset

    # given a versioned bucket whose endpoint is down while the line runs
    bucket = new_bucket(s3)
    s3.stop()
    caplog.set_level(logging.INFO, logger="lineside.agent.s3.uploads")
    caplog.set_level(logging.INFO, logger="werkzeug")  # moto's server logs each request it answers
    run = runs(config_for(frames["folder"], tmp_path / "queue", bucket, s3.url))
    run.wait_finished()
    expected = flagged_names(frames["expect"])

    # then inference went on: every frame has its result, flagged ones wait on disk
    assert run.results() == len(frames["expect"])
    wait_until(lambda: len(run.of("upload_failed")) >= 1)
    assert run.uploads.queue_depths() == {"uploads": len(expected)}
    time.sleep(1.0)  # several retries while down

    # when the endpoint comes back
    s3.start()
    wait_until(lambda: run.uploads.queue_depths()["uploads"] == 0)

    # then each flagged frame's image, result and manifest is there exactly once
    versions = all_versions(s3, bucket)
    assert set(versions.values()) == {1}, versions
    assert len(versions) == 3 * len(expected)
    assert {k.rsplit(".", 1)[1] for k in versions} == {"png", "json", "manifest"}
    # the manifest went up last (the server's own access log, in order): it never names a missing image
    puts = [
        r.getMessage().split(f"PUT /{bucket}/", 1)[1].split(" ", 1)[0]
        for r in caplog.records
        if r.name == "werkzeug" and f'"PUT /{bucket}/' in r.getMessage() and '" 200 ' in r.getMessage()
    ]
    assert sorted(puts) == sorted(versions)
    for key in puts:
        if key.endswith(".manifest"):
            stem = key.removesuffix(".manifest")
            assert puts.index(key) > max(puts.index(f"{stem}.png"), puts.index(f"{stem}.json"))
    today = datetime.now(UTC)
    assert all(k.startswith(f"flagged/cell-1/{today:%Y}/{today:%m}/") for k in versions)
    # the outage was logged once (not once per retry) and reported as events
    assert len(run.of("upload_failed")) == 1 and run.of("upload_failed")[0].data["bucket"] == bucket
    assert caplog.text.count(f"uploads to bucket {bucket} failing") == 1
    assert len(run.of("upload_resumed")) == 1
    counters = run.agent.status().service_counters["uploads"]
    assert counters["uploaded"] == len(expected) and counters["upload_errors"] >= 2
    assert counters["flagged_defective"] == 4 and counters["flagged_uncertain"] == 2

    # and the export stage reads the prefix as one data set whose images exist
    dataset = open_dataset(f"s3://{bucket}/flagged")
    assert len(dataset.samples) == len(expected)
    client = s3.client()
    by_file: dict[str, Any] = {}
    for sample in dataset.samples:
        key = sample.uri.removeprefix(f"s3://{bucket}/")
        assert key in versions
        result = json.loads(client.get_object(Bucket=bucket, Key=key.rsplit(".", 1)[0] + ".json")["Body"].read())
        by_file[result["meta"]["file"]] = (sample, key, result)
    assert set(by_file) == expected
    for name, (sample, key, result) in by_file.items():
        assert sample.annotated is False  # machine labels: never ground truth
        assert sample.label is (frames["expect"][name] == "defective")
        raw = json.loads(client.get_object(Bucket=bucket, Key=key.rsplit(".", 1)[0] + ".manifest")["Body"].read())
        assert raw["anomaly-label-metadata"]["human-annotated"] == "no"
        assert raw["anomaly-label-metadata"]["class-name"] == ("anomaly" if sample.label else "normal")
        assert raw["lineside-result-id"] == result["result_id"] and raw["lineside-flag"] == frames["expect"][name]
        if sample.label:
            assert [(b.x1, b.y1, b.x2, b.y2) for b in sample.boxes] == [(5.0, 6.0, 25.0, 20.0)]
            assert raw["bounding-box-metadata"]["objects"] == [{"confidence": 0.87}]
        else:
            assert sample.boxes == () and raw["bounding-box"]["annotations"] == []
    # the 16-bit image comes back 16-bit, byte- and pixel-identical to the file
    _, key16, _ = by_file["d_deep16.png"]
    data16 = client.get_object(Bucket=bucket, Key=key16)["Body"].read()
    assert data16 == (frames["folder"] / "d_deep16.png").read_bytes()
    back = by_file["d_deep16.png"][0].load()
    original = cv2.imread(str(frames["folder"] / "d_deep16.png"), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint16 and np.array_equal(back, original)


def test_which_frames_are_flagged() -> None:
    def result(score: float | None, *, error: bool = False, rid: str = "r") -> InspectionResult:
        now = datetime.now(UTC)
        return InspectionResult(
            result_id=rid,
            frame_id="f",
            source="s",
            captured_at=now,
            inspected_at=now,
            is_defective=None if score is None else score >= 0.5,
            score=score,
            boxes=[ResultBox(x1=0, y1=0, x2=1, y2=1, score=0.9, source="ssd")] if score and score >= 0.5 else [],
            error=ResultError(code="decode_failed", message="x") if error else None,
        )

    def flag(r: InspectionResult, band: float = 0.1, rate: float = 0.0) -> str | None:
        return flag_reason(r, uncertain_band=band, normal_sample_rate=rate)

    # defective always; the band is inclusive on both sides; clear normals not at rate 0
    assert flag(result(0.97)) == "defective" and flag(result(0.5)) == "defective"
    assert flag(result(0.4)) == "uncertain" and flag(result(0.39)) is None
    assert flag(result(0.45), band=0.0) is None and flag(result(0.2), band=0.3) == "uncertain"
    # error results are never uploaded, whatever the rate
    assert flag(result(None, error=True), rate=1.0) is None
    # sampling: decided by the result id alone (a replayed frame decides the same way), rate respected
    ids = [f"id-{i}" for i in range(20_000)]
    picked = [i for i in ids if flag(result(0.05, rid=i), rate=0.01) == "sampled"]
    assert 140 <= len(picked) <= 260  # 200 expected; binomial sd ~14
    assert picked == [i for i in ids if flag(result(0.05, rid=i), rate=0.01) == "sampled"]
    assert all(sample_unit(i) < 0.01 for i in picked)
    assert sum(flag(result(0.05, rid=i), rate=0.2) == "sampled" for i in ids[:2000]) in range(340, 461)
    assert all(flag(result(0.05, rid=i), rate=1.0) == "sampled" for i in ids[:100])


def test_sampled_normals_are_uploaded_at_the_rate(
    s3: S3Endpoint, tmp_path: Path, runs: Callable[[AgentConfig], Run]
) -> None:
    # given 60 clear normal frames and a 50 % sample rate
    folder = tmp_path / "normals"
    folder.mkdir()
    for i in range(60):
        noise_png(folder / f"n{i:02d}.png", NORMAL, seed=100 + i, size=(16, 16))
    bucket = new_bucket(s3)
    run = runs(config_for(folder, tmp_path / "queue", bucket, s3.url, uploads={"normal_sample_rate": 0.5}))
    run.wait_finished()
    wait_until(lambda: run.uploads.queue_depths()["uploads"] == 0)

    # then exactly the frames whose result id samples under the rate are up
    counters = run.agent.status().service_counters["uploads"]
    manifests = [k for k in all_versions(s3, bucket) if k.endswith(".manifest")]
    assert len(manifests) == counters["flagged_sampled"] == counters["uploaded"]
    assert 15 <= len(manifests) <= 45
    ids = {k.rsplit("/", 1)[1].removesuffix(".manifest") for k in manifests}
    assert all(sample_unit(i) < 0.5 for i in ids)


def test_the_queue_survives_a_restart(
    s3: S3Endpoint, frames: dict[str, Any], tmp_path: Path, runs: Callable[[AgentConfig], Run]
) -> None:
    # given an agent that spooled its flagged frames while S3 was down, then stopped
    bucket = new_bucket(s3)
    s3.stop()
    config = config_for(frames["folder"], tmp_path / "queue", bucket, s3.url)
    first = runs(config)
    first.wait_finished()
    expected = flagged_names(frames["expect"])
    wait_until(lambda: len(first.of("upload_failed")) >= 1)
    started = time.monotonic()
    first.agent.stop()
    assert time.monotonic() - started < config.stop_timeout_s
    assert len(list((tmp_path / "queue").glob("*.item"))) == len(expected)

    # and the first item's image had reached S3 before the agent was killed (the state a crash between
    # two parts leaves)
    s3.start()
    from lineside.agent.s3.spool import Spool

    spool = Spool(tmp_path / "queue", 10**9)
    [image, *_] = spool.read(spool.oldest())  # type: ignore[arg-type]
    s3.client().put_object(Bucket=bucket, Key=image.key, Body=image.data)

    # when the agent starts again (replaying the same frames: same result ids)
    second = runs(config)
    second.wait_finished()
    wait_until(lambda: second.uploads.queue_depths()["uploads"] == 0)

    # then everything from before went up, once
    versions = all_versions(s3, bucket)
    assert len(versions) == 3 * len(expected) and set(versions.values()) == {1}, versions
    assert not list((tmp_path / "queue").glob("*.item"))

    # when the same frames come once more (a replay after everything was uploaded)
    second.agent.stop()
    third = runs(config)
    third.wait_finished()
    wait_until(lambda: third.uploads.queue_depths()["uploads"] == 0)

    # then nothing is written again
    assert all_versions(s3, bucket) == versions
    assert third.uploads.counters()["already_uploaded"] == len(expected)


def test_a_full_queue_evicts_the_oldest_counted_and_reported(
    s3: S3Endpoint, tmp_path: Path, runs: Callable[[AgentConfig], Run], caplog: pytest.LogCaptureFixture
) -> None:
    # given 12 defective frames of ~9 KB each and a queue bound of 40 KB, S3 down
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(12):
        noise_png(folder / f"f{i:02d}.png", DEFECTIVE, seed=200 + i, size=(96, 96))
    bucket = new_bucket(s3)
    s3.stop()
    caplog.set_level(logging.WARNING, logger="lineside.agent.s3.uploads")
    run = runs(config_for(folder, tmp_path / "queue", bucket, s3.url, uploads={"max_queue_mb": 40 / 1024}))
    run.wait_finished()
    counters = run.agent.status().service_counters["uploads"]
    evicted = counters["evicted"]
    assert evicted >= 5
    wait_until(lambda: sum(e.data["count"] for e in run.of("upload_evicted")) == evicted)

    # then the bound holds, and it is visible on /metrics
    assert run.uploads.spool.size_bytes() <= 40 * 1024
    health = next(s for s in run.agent.services if s.name == "health")
    with urllib.request.urlopen(f"http://127.0.0.1:{health.port}/metrics", timeout=10) as response:  # type: ignore[attr-defined]
        metrics = response.read().decode()
    assert f'lineside_service_events_total{{counter="evicted",service="uploads"}} {evicted}.0' in metrics
    assert 'lineside_queue_depth{queue="uploads"}' in metrics
    assert "evicted the" in caplog.text and "unsent" in caplog.text

    # when S3 comes back
    s3.start()
    wait_until(lambda: run.uploads.queue_depths()["uploads"] == 0)

    # then every frame not evicted is up, and the newest ones are among them
    manifests = sorted(k for k in all_versions(s3, bucket) if k.endswith(".manifest"))
    assert len(manifests) + evicted == 12 == counters["spooled"]
    client = s3.client()
    files = {
        json.loads(client.get_object(Bucket=bucket, Key=k.removesuffix(".manifest") + ".json")["Body"].read())["meta"][
            "file"
        ]
        for k in manifests
    }
    assert {"f10.png", "f11.png"} <= files


def test_a_missing_bucket_is_reported_retried_and_recovered(
    s3: S3Endpoint,
    frames: dict[str, Any],
    tmp_path: Path,
    runs: Callable[[AgentConfig], Run],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given a bucket name that does not exist (yet)
    bucket = new_bucket(s3, create=False)
    caplog.set_level(logging.INFO, logger="lineside.agent.s3.uploads")
    run = runs(config_for(frames["folder"], tmp_path / "queue", bucket, s3.url))
    run.wait_finished()
    wait_until(lambda: run.uploads.counters()["upload_errors"] >= 3)

    # then the pipeline kept going, and one clear event and error line name the bucket and the code
    assert run.results() == len(frames["expect"])
    [failed] = run.of("upload_failed")
    assert failed.data["code"] == "NoSuchBucket" and failed.data["bucket"] == bucket and failed.data["permanent"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and bucket in r.getMessage()]
    assert len(errors) == 1 and "NoSuchBucket" in errors[0].getMessage()
    assert "testing" not in caplog.text  # the (test) secret key never reaches a log line

    # when an operator creates the bucket
    s3.client().create_bucket(Bucket=bucket)
    wait_until(lambda: run.uploads.queue_depths()["uploads"] == 0)

    # then the backlog goes up
    assert len([k for k in all_versions(s3, bucket) if k.endswith(".manifest")]) == len(flagged_names(frames["expect"]))
    assert len(run.of("upload_resumed")) == 1


def test_access_denied_is_reported_retried_and_recovered(
    s3: S3Endpoint,
    frames: dict[str, Any],
    tmp_path: Path,
    runs: Callable[[AgentConfig], Run],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # given a bucket whose policy forbids writing (a 403 from the server, as a wrong IAM policy gives)
    bucket = new_bucket(s3)
    deny = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/*"}
        ],
    }
    s3.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(deny))
    caplog.set_level(logging.INFO, logger="lineside.agent.s3.uploads")
    run = runs(config_for(frames["folder"], tmp_path / "queue", bucket, s3.url))
    run.wait_finished()
    wait_until(lambda: run.uploads.counters()["upload_errors"] >= 2)

    # then inference went on, nothing was written, and one event and one error line name bucket and code
    assert run.results() == len(frames["expect"])
    assert not [k for k in all_versions(s3, bucket) if k.endswith(".manifest")]
    [failed] = run.of("upload_failed")
    # (the code is the server's: AccessDenied on a PUT, a bare 403 on a HEAD, which has no body)
    assert (
        failed.data["bucket"] == bucket and failed.data["code"] in ("AccessDenied", "403") and failed.data["permanent"]
    )
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and bucket in r.getMessage()]
    assert len(errors) == 1 and failed.data["code"] in errors[0].getMessage()

    # when the policy is fixed, the backlog goes up
    s3.client().delete_bucket_policy(Bucket=bucket)
    wait_until(lambda: run.uploads.queue_depths()["uploads"] == 0)
    assert len([k for k in all_versions(s3, bucket) if k.endswith(".manifest")]) == len(flagged_names(frames["expect"]))


def test_a_failing_spool_is_counted_and_reported_never_raised(
    s3: S3Endpoint, tmp_path: Path, runs: Callable[[AgentConfig], Run], caplog: pytest.LogCaptureFixture
) -> None:
    # given an agent on a hot folder whose queue folder breaks (tmp/ replaced by a file: every write fails)
    hot = tmp_path / "hot"
    hot.mkdir()
    bucket = new_bucket(s3)
    queue = tmp_path / "queue"
    caplog.set_level(logging.INFO, logger="lineside.agent.s3.uploads")
    source = {"kind": "folder", "path": str(hot), "settle_seconds": 0, "poll_interval": 0.05}
    run = runs(config_for(hot, queue, bucket, s3.url, source=source))
    (queue / "tmp").rmdir()
    (queue / "tmp").write_text("not a folder")

    def drop(i: int) -> None:  # complete under a dot name, then renamed in, as the hot-folder contract asks
        noise_png(hot / f".d{i}.png", DEFECTIVE, seed=300 + i).rename(hot / f"d{i}.png")

    # when defective frames arrive
    for i in range(3):
        drop(i)
    wait_until(lambda: run.uploads.counters()["spool_failed"] == 3)

    # then each is counted, reported (one event while it lasts), logged once, and inference went on
    wait_until(lambda: run.results() == 3)
    assert run.agent.status().counters["sink_failures"].get("uploads", 0) == 0
    assert [e.data["count"] for e in run.of("upload_spool_failed")] == [1]
    assert caplog.text.count("cannot queue flagged frames") == 1

    # when the folder is repaired
    (queue / "tmp").unlink()
    (queue / "tmp").mkdir()
    drop(3)
    wait_until(lambda: run.uploads.counters()["uploaded"] == 1)

    # then the rest of the count is reported, and uploads go on
    assert sum(e.data["count"] for e in run.of("upload_spool_failed")) == 3
    assert "queueing works again" in caplog.text


def test_frames_from_jpeg_are_uploaded_as_lossless_png(
    s3: S3Endpoint, tmp_path: Path, runs: Callable[[AgentConfig], Run]
) -> None:
    # given a defective frame from a JPEG file (lossy already: the pixels the model saw are kept)
    folder = tmp_path / "jpeg"
    folder.mkdir()
    image = np.full((40, 50), 220, np.uint8)
    image[10:20, 10:20] = 30
    ok, encoded = cv2.imencode(".jpg", image)
    assert ok
    (folder / "shot.jpg").write_bytes(encoded.tobytes())
    decoded = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    bucket = new_bucket(s3)
    run = runs(config_for(folder, tmp_path / "queue", bucket, s3.url))
    run.wait_finished()
    wait_until(lambda: run.uploads.counters()["uploaded"] == 1)

    # then a PNG holding exactly the decoded pixels
    [key] = [k for k in all_versions(s3, bucket) if k.endswith(".png")]
    data = s3.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED), decoded)
    assert run.agent.status().service_counters["uploads"]["images_encoded"] == 1


# -- configuration --------------------------------------------------------------------------------


def _problems(data: dict[str, Any]) -> list[str]:
    base = {"station": "a", "bundle": {"path": "/tmp"}, "source": {"kind": "replay", "path": "/tmp"}}
    with pytest.raises(ConfigError) as info:
        parse_config({**base, **data})
    return info.value.problems


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"uploads": {}}, "uploads: Value error, uploads are enabled but there is no `s3:` section"),
        ({"s3": {"bucket": "b-1"}, "uploads": {"queue": "/x"}}, "uploads.queue: Extra inputs are not permitted"),
        ({"s3": {"bucket": "b-1"}, "uploads": {"uncertain_band": 0.7}}, "uploads.uncertain_band: Input should be"),
        ({"s3": {"bucket": "b-1"}, "uploads": {"normal_sample_rate": -0.1}}, "uploads.normal_sample_rate: Input"),
        ({"s3": {"bucket": "b-1"}, "uploads": {"max_queue_mb": 0}}, "uploads.max_queue_mb: Input should be"),
        (
            {"s3": {"bucket": "b-1"}, "uploads": {"backoff_min_s": 60, "backoff_max_s": 5}},
            "uploads: Value error, backoff_min_s (60.0) exceeds backoff_max_s (5.0)",
        ),
    ],
)
def test_config_errors_name_the_key(section: dict[str, Any], expected: str) -> None:
    problems = _problems(section)
    assert any(p.startswith(expected) for p in problems), problems


def test_a_bad_s3_section_is_not_blamed_on_uploads() -> None:
    problems = _problems({"s3": {"bucket": "X"}, "uploads": {}})
    assert [p.split(":")[0] for p in problems] == ["s3.bucket"]


def test_disabled_uploads_need_no_s3_and_check_config_names_the_queue_dir(tmp_path: Path) -> None:
    base = {"station": "a", "bundle": {"path": str(tmp_path)}, "source": {"kind": "replay", "path": str(tmp_path)}}
    assert parse_config({**base, "uploads": {"enabled": False}}).uploads is not None
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = parse_config({**base, "s3": {"bucket": "b-1"}, "uploads": {"queue_dir": str(blocker)}})
    assert f"uploads.queue_dir: {blocker} is not a folder" in config.problems()


def test_the_upload_sink_never_waits_for_the_network(
    s3: S3Endpoint, tmp_path: Path, runs: Callable[[AgentConfig], Run]
) -> None:
    # given S3 that accepts connections but never answers (a hung proxy)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    folder = tmp_path / "line"
    folder.mkdir()
    for i in range(5):
        noise_png(folder / f"d{i}.png", DEFECTIVE, seed=400 + i)
    try:
        config = config_for(folder, tmp_path / "queue", "any-bucket", f"http://127.0.0.1:{hung.getsockname()[1]}")
        started = time.monotonic()
        run = runs(config)
        run.wait_finished()
        took = time.monotonic() - started

        # then every frame went through at once, and is queued
        assert run.results() == 5 and took < 10
        assert run.uploads.queue_depths()["uploads"] >= 4
        stop_started = time.monotonic()
        run.agent.stop()
        assert time.monotonic() - stop_started < config.stop_timeout_s
    finally:
        hung.close()
    assert len(list((tmp_path / "queue").glob("*.item"))) == 5


def test_stop_is_quick_while_idle(s3: S3Endpoint, tmp_path: Path, runs: Callable[[AgentConfig], Run]) -> None:
    folder = tmp_path / "hot"
    folder.mkdir()
    source = {"kind": "folder", "path": str(folder), "poll_interval": 0.05}
    run = runs(config_for(folder, tmp_path / "queue", new_bucket(s3), s3.url, source=source))
    started = time.monotonic()
    run.agent.stop()
    assert time.monotonic() - started < 3
    assert not any(t.name == "lineside-uploads" for t in threading.enumerate())


def test_the_commented_example_sections_are_a_valid_config() -> None:
    # given the s3: and uploads: block of deploy/agent.example.yaml, uncommented
    import yaml

    example = Path(__file__).resolve().parents[2] / "deploy" / "agent.example.yaml"
    lines = example.read_text(encoding="utf-8").splitlines()
    start = lines.index("# s3:")
    block = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        block.append(line[2:] if line.startswith("# ") else line[1:])
    data = yaml.safe_load(example.read_text(encoding="utf-8"))
    data.update(yaml.safe_load("\n".join(block)))

    # then it validates, with every uploads key spelled as the model has it
    config = parse_config(data)
    assert config.uploads is not None and config.s3 is not None
    assert set(yaml.safe_load("\n".join(block))["uploads"]) == set(type(config.uploads).model_fields)
