"""The retraining loop closed, with every part real: the agent flags frames and uploads them to S3 (moto server
over HTTP); a reviewer confirms the labels as a labelling job would; `lineside-export` trains the three models
from that manifest, builds, signs and publishes a bundle; the same agent picks it up from its channel and
serves it between two frames.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from lineside.agent.config import parse_config
from lineside.agent.events import Event
from lineside.agent.lfv_manifest import build_line, parse_line, to_line
from lineside.agent.runtime import Agent
from lineside.agent.s3.signing import generate_keypair
from lineside.agent.sinks.base import Sink

pytestmark = pytest.mark.export  # trains with MXNet: the full environment only

REPO = Path(__file__).resolve().parents[2]
PREFIX = "plant"
STATION = "cell-9"
NEW_VERSION = "2026.12.31-retrained"


def wait_for(check: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def export_cli(*args: str) -> None:
    """`lineside-export ARGS` as a process (its S3 endpoint and test credentials come from the environment)."""
    done = subprocess.run(
        [sys.executable, "-m", "lineside.export.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"lineside-export {args[0]} failed:\n{done.stderr[-4000:]}"


def review(client: Any, bucket: str, truth: dict[str, Any]) -> str:
    """What a labelling job does with the agent's uploads: every machine line confirmed or corrected by a
    person (here, from the synthetic set's ground truth), written as one output manifest. Returns its URI."""
    lines = []
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{PREFIX}/{STATION}/")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    for key in sorted(k for k in keys if k.endswith(".manifest")):
        machine = parse_line(client.get_object(Bucket=bucket, Key=key)["Body"].read().decode(), key)
        assert machine.human_verified is False  # the agent never claims a person looked
        result = json.loads(client.get_object(Bucket=bucket, Key=key[: -len(".manifest")] + ".json")["Body"].read())
        sample = truth[Path(result["meta"]["file"]).stem]
        size = (result["width"], result["height"])
        boxes = [(b.x1, b.y1, b.x2, b.y2) for b in sample.boxes]
        lines.append(
            to_line(
                build_line(
                    machine.source_ref,
                    anomaly=bool(sample.label),
                    boxes=boxes,
                    image_size=size,
                    part_id=machine.part_id,
                    human_annotated=True,
                )
            )
        )
    output = "reviewed/output.manifest"
    client.put_object(Bucket=bucket, Key=output, Body=("\n".join(lines) + "\n").encode())
    return f"s3://{bucket}/{output}"


def test_flagged_frames_come_back_as_a_bundle_the_agent_serves(
    make_sink: Callable[[], Sink], s3_endpoint: str, test_bundle: Path, synth_dir: Path, tmp_path: Path
) -> None:
    from lineside.export.data import open_dataset

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"loop-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    private_key, public_key = generate_keypair(tmp_path / "keys" / "signing")
    truth = {s.name: s for s in open_dataset(synth_dir).samples}

    # given an agent on a hot folder of the synthetic series, uploading every frame (band 0.5 flags all),
    # following the stable channel
    hot = tmp_path / "hot"
    hot.mkdir()
    images = sorted(synth_dir.rglob("*.png"))
    assert len(images) >= 40
    first, later = images[:-4], images[-4:]
    for image in first:
        shutil.copy(image, hot / image.name)
    config = parse_config(
        {
            "station": STATION,
            "bundle": {"path": str(test_bundle)},
            "inference": {"providers": ["cpu"]},
            "source": {
                "kind": "folder",
                "path": str(hot),
                "state_dir": str(tmp_path / "state"),
                "settle_seconds": 0.2,
                "poll_interval": 0.1,
                "part_id_regex": r"^(?P<part>S\d+)_",  # the series: manifests carry it, splits go by it
            },
            "sinks": [],
            "status_log": {"interval_s": 0},
            "health": {"enabled": False},
            "notify": {"enabled": False},
            "s3": {"bucket": bucket, "prefix": PREFIX, "endpoint_url": s3_endpoint},
            "uploads": {
                "uncertain_band": 0.5,
                "queue_dir": str(tmp_path / "uploads"),
                "backoff_min_s": 0.2,
                "backoff_max_s": 1,
            },
            "updates": {
                "channel": "stable",
                "poll_seconds": 1,
                "public_key": str(public_key),
                "bundles_dir": str(tmp_path / "bundles"),
                "min_free_mb": 0,
            },
        }
    )
    sink = make_sink()
    events: list[Event] = []
    agent = Agent(config, sinks=[sink])
    agent.events.subscribe(events.append)
    agent.start()
    try:
        old_version = agent.status().bundle_version
        wait_for(lambda: len(sink.results) >= len(first), "the first frames inspected")
        uploads = agent.status().service_counters
        wait_for(
            lambda: (
                agent.status().service_counters.get("uploads", {}).get("uploaded", 0) >= len(first)
                and agent.status().queue_depths.get("uploads", 1) == 0
            ),
            f"every flagged frame uploaded (counters {uploads})",
        )

        # when the uploads are reviewed, trained on, built into a bundle and published, signed
        reviewed = review(client, bucket, truth)
        runs = tmp_path / "runs"
        for kind in ("classifier", "vae", "ssd"):
            export_cli(
                f"train-{kind}", "--data", reviewed, "--out", str(runs / kind),
                "--epochs", "2", "--iters", "3", "--batch-size", "4", "--seed", "1",
            )  # fmt: skip
        bundle = tmp_path / "retrained"
        export_cli(
            "build", "--classifier", str(runs / "classifier"), "--vae", str(runs / "vae"), "--ssd", str(runs / "ssd"),
            "--calib", reviewed, "--out", str(bundle), "--version", NEW_VERSION,
        )  # fmt: skip
        export_cli("publish", "--bundle", str(bundle), "--to", f"s3://{bucket}/{PREFIX}", "--channel", "stable",
                   "--sign", str(private_key))  # fmt: skip

        # then the agent swaps to it by itself, and the next frames are inspected by it
        wait_for(lambda: agent.status().bundle_version == NEW_VERSION, "the agent to serve the retrained bundle")
        for image in later:
            shutil.copy(image, hot / image.name)
        wait_for(lambda: len(sink.results) >= len(images), "the later frames inspected")
    finally:
        agent.stop()

    # the retrained bundle was trained from the uploaded manifest: its dataset is that manifest, split by series
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["dataset"]["root"] == reviewed
    assert len(manifest["dataset"]["train_groups"]) >= 2
    # every frame has a result, the version switched exactly once and never back
    versions = [r.bundle_version for r in sink.results]
    assert len(sink.results) == len(images) and all(r.error is None for r in sink.results)
    switch = versions.index(NEW_VERSION)
    assert set(versions[:switch]) == {old_version} and set(versions[switch:]) == {NEW_VERSION}
    assert {Path(str(r.meta["file"])).name for r in sink.results[switch:]} >= {p.name for p in later}
    activated = [e for e in events if e.kind == "bundle_activated"]
    assert len(activated) == 1 and not [e for e in events if e.kind == "update_rejected"]
