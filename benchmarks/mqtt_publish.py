"""Sustained MQTT publish rate and frame -> PUBACK latency through the durable outbox, on a local mosquitto.

What is timed is the agent's own path for one result: `Outbox.put` (the SQLite commit the result sink makes
before a frame is acknowledged) -> the pump hands it to paho -> the broker's PUBACK -> deleted from the
outbox. A real result JSON (about 1 KB, two boxes) is used as the payload. Not a test: figures go to
docs/benchmarks.md.

    .venv-agent/bin/python benchmarks/mqtt_publish.py --messages 3000 --synchronous full normal --rates 0 100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from lineside.agent.mqtt.config import MqttConfig
from lineside.agent.mqtt.link import MqttLink
from lineside.agent.mqtt.outbox import Outbox
from lineside.agent.results import InspectionResult, ResultBox

MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin") or "mosquitto"


def start_broker(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    conf = folder / "mosquitto.conf"
    user = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n{user}log_dest file {folder}/log\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def sample_payload(i: int) -> bytes:
    now = datetime.now(UTC)
    box = ResultBox(x1=10, y1=20, x2=40, y2=60, score=0.91, source="ssd")
    result = InspectionResult(
        result_id=f"00000000-0000-0000-0000-{i:012d}",
        frame_id=f"W-{i:06d}_v1.png",
        source="folder",
        part_id=f"W-{i:06d}",
        view=1,
        captured_at=now,
        inspected_at=now,
        latency_ms={"decode": 7.6, "queue": 0.2, "inference": 150.3, "total": 160.1},
        bundle_id="d1da0dec-8a32-44a1-896a-87aba3c0745e",
        bundle_version="2026.11.24-131143",
        providers=["CPUExecutionProvider"],
        width=768,
        height=572,
        is_defective=True,
        score=0.83,
        model_scores={"classifier": 0.91, "vae": 1.2, "ssd": 0.88},
        boxes=[box, box],
        meta={"file": f"W-{i:06d}_v1.png"},
    )
    return result.model_dump_json().encode()


def run(port: int, folder: Path, messages: int, synchronous: str, inflight: int, rate: float) -> dict[str, float]:
    """One run; `rate` > 0 paces the puts (a line's frame rate: latency without a backlog), 0 = as fast as
    the outbox takes them (the sustained rate; latency then includes the queue)."""
    config = MqttConfig.model_validate(
        {
            "port": port,
            "topic_prefix": "bench/station",
            "outbox": {
                "path": str(folder / f"outbox-{synchronous}-{rate:g}.sqlite"),
                "synchronous": synchronous,
                "inflight": inflight,
            },
        }
    )
    outbox = Outbox(config.outbox.path, synchronous=synchronous)
    put_at: dict[int, float] = {}
    acked_at: dict[int, float] = {}
    delete = outbox.delete

    def timed_delete(seqs: list[int]) -> int:  # the pump deletes a message when its PUBACK arrived
        now = time.perf_counter()
        for seq in seqs:
            acked_at[seq] = now
        return delete(seqs)

    outbox.delete = timed_delete  # type: ignore[method-assign]
    link = MqttLink(config, "station", outbox, offline_payload=b'{"state": "offline"}')
    link.start()
    if not link.connected.wait(10):
        raise RuntimeError("not connected")
    payloads = [sample_payload(i) for i in range(messages)]
    start = time.perf_counter()
    for i, payload in enumerate(payloads):
        if rate > 0:
            wait = start + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        t = time.perf_counter()
        outbox.put(link.topic("result"), payload, qos=1, key=f"r{i}")
        put_at[i + 1] = t  # seq = insertion order, from 1 in a fresh outbox
        link.wake()
    put_end = time.perf_counter()
    while len(acked_at) < messages:
        time.sleep(0.005)
    end = max(acked_at.values())
    link.close(None)
    outbox.close()
    latencies = sorted((acked_at[s] - put_at[s]) * 1000 for s in put_at)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * len(latencies)) - 1)]
    return {
        "messages": messages,
        "payload_bytes": len(payloads[0]),
        "put_rate_per_s": messages / (put_end - start),
        "sustained_rate_per_s": messages / (end - start),
        "latency_median_ms": statistics.median(latencies),
        "latency_p99_ms": p99,
        "latency_max_ms": latencies[-1],
    }


def machine() -> dict[str, str]:
    load = os.getloadavg()
    version = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    cpu = "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    import paho.mqtt

    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "paho-mqtt": paho.mqtt.__version__,
        "broker": version,
        "load average (1, 5, 15 min)": ", ".join(f"{x:.1f}" for x in load),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--synchronous", nargs="+", default=["full", "normal"], choices=["full", "normal"])
    parser.add_argument("--inflight", type=int, default=100)
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[0.0, 100.0], help="puts per second; 0 = as fast as possible"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-mqtt-") as tmp:
        folder = Path(tmp)
        broker, port = start_broker(folder)
        try:
            figures = {
                f"synchronous={mode}, rate={'max' if rate == 0 else f'{rate:g}/s'}": run(
                    port, folder, args.messages, mode, args.inflight, rate
                )
                for mode in args.synchronous
                for rate in args.rates
            }
        finally:
            broker.terminate()
            broker.wait(10)
    report = {"machine": machine(), "inflight": args.inflight, "results": figures}
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
