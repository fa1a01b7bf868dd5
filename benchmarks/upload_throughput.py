"""Flagged uploads: what the pipeline waits for (the sink's `publish`: flag, read the original file, spool
with fsync) and how fast the uploader empties the queue into S3 (moto's server on loopback).

Each run: `--frames` defective results over real 16-bit PNG files (768x572, noise, so they do not compress
away) are published to `UploadSink` while the uploader thread runs; timed per call, then until the queue
is empty. Not a test: figures go to docs/benchmarks.md.

    .venv-agent/bin/python benchmarks/upload_throughput.py --frames 200 --runs 5
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np

from lineside.agent.events import EventHub
from lineside.agent.results import Frame, InspectionResult, ResultBox
from lineside.agent.s3.config import S3Config
from lineside.agent.s3.uploads import UploadsConfig, UploadsService


def make_frames(folder: Path, n: int, size: tuple[int, int]) -> list[tuple[InspectionResult, Frame]]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        image = np.clip(rng.normal(40000, 3000, size), 0, 65535).astype(np.uint16)
        ok, encoded = cv2.imencode(".png", image)
        assert ok
        data = encoded.tobytes()
        name = f"W-{i:06d}_v1.png"
        (folder / name).write_bytes(data)
        now = datetime.now(UTC)
        rid = f"00000000-0000-4000-8000-{i:012d}"
        frame = Frame(
            frame_id=name,
            key=name,
            source="folder",
            image=image,
            captured_wall=now,
            captured_mono=time.monotonic(),
            meta={"file": name, "sha256": hashlib.sha256(data).hexdigest()},
            station="bench",
        )
        box = ResultBox(x1=10, y1=20, x2=40, y2=60, score=0.91, source="ssd")
        result = InspectionResult(
            result_id=rid,
            frame_id=name,
            source="folder",
            captured_at=now,
            inspected_at=now,
            width=size[1],
            height=size[0],
            is_defective=True,
            score=0.83,
            boxes=[box, box],
            meta={"file": name},
        )
        out.append((result, frame))
    return out


def one_run(endpoint: str, bucket: str, frames: list[tuple[InspectionResult, Frame]], source: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-uploads-") as queue:
        agent: Any = SimpleNamespace(
            config=SimpleNamespace(station="bench", source=SimpleNamespace(path=source)), events=EventHub()
        )
        s3 = S3Config(bucket=bucket, prefix=f"run-{time.time_ns()}", endpoint_url=endpoint)
        service = UploadsService(agent, UploadsConfig(queue_dir=Path(queue), normal_sample_rate=0), s3)
        service.start(threading.Event())
        sink = service.sinks()[0]
        latencies = []
        start = time.perf_counter()
        for result, frame in frames:
            t0 = time.perf_counter()
            sink.publish(result, frame)
            latencies.append((time.perf_counter() - t0) * 1000.0)
        spooled = time.perf_counter() - start
        while service.queue_depths()["uploads"]:
            time.sleep(0.005)
        total = time.perf_counter() - start
        service.close()
        assert service.counters()["uploaded"] == len(frames), service.counters()
    latencies.sort()
    return {
        "publish_median_ms": statistics.median(latencies),
        "publish_p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "publish_max_ms": latencies[-1],
        "results_per_s_spooled": len(frames) / spooled,
        "images_per_s_uploaded": len(frames) / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=200, help="flagged results per run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--height", type=int, default=572)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    import boto3
    import moto
    from moto.server import ThreadedMotoServer

    for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-uploads")

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores, ")
    print(
        f"  {platform.system()} {platform.release()}, Python {platform.python_version()}, boto3 {boto3.__version__}, "
    )
    print(f"  moto {moto.__version__}, load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-frames-") as folder:
        frames = make_frames(Path(folder), args.frames, (args.height, args.width))
        size = sum(len((Path(folder) / f.meta["file"]).read_bytes()) for _r, f in frames) / len(frames)
        print(f"{args.frames} flagged results per run, 16-bit {args.width}x{args.height} PNG of {size / 1024:.0f} KiB")
        for i in range(args.runs):
            row = one_run(endpoint, "bench-uploads", frames, Path(folder))
            rows.append(row)
            print(f"run {i + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))
    server.stop()
    summary = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print("median of runs: " + ", ".join(f"{k} {v:.1f}" for k, v in summary.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": rows, "median": summary}, indent=2))


if __name__ == "__main__":
    main()
