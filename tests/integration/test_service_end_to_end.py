"""The daemon as systemd runs it, with the real bundle on CPU: the sd_notify exchange over a real
NOTIFY_SOCKET, /readyz and /metrics over HTTP while real frames flow, STOPPING and exit 0 on SIGTERM;
a missing bundle never reports READY."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lineside.agent.bundle.manifest import BundleManifest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 90.0  # bundle verification, sessions, warm-up and golden check on a busy CPU


class Systemd:
    """The part of systemd the daemon talks to: a bound notify socket collecting messages."""

    def __init__(self) -> None:
        self.address = f"@lineside-e2e-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str, proc: subprocess.Popen[bytes], log: Path) -> dict[str, str]:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append(message)
            if message.get(key) == value:
                return message
        raise AssertionError(f"no {key}={value}; got {self.messages[-5:]}\n{log.read_text()[-3000:]}")


@pytest.fixture
def systemd() -> Iterator[Systemd]:
    server = Systemd()
    yield server
    server.sock.close()


def start(config: Path, log: Path, systemd: Systemd) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "JOURNAL_STREAM", "AWS_PROFILE")}
    env.update(NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="4000000", PYTHONUNBUFFERED="1")
    out: IO[bytes]
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "lineside.agent.cli", "run", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def write_config(tmp_path: Path, bundle: Path) -> Path:
    config: dict[str, Any] = {
        "station": "cell-07",
        "bundle": {"path": str(bundle)},
        "inference": {"providers": ["cpu"]},
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
        "sinks": [{"kind": "jsonl", "path": str(tmp_path / "results.jsonl"), "fsync": True}],
        "health": {"port": 0},
        "notify": {"status_interval_s": 0.5},
    }
    (tmp_path / "hot").mkdir(exist_ok=True)
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def wait_until(check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while not check():
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def test_ready_metrics_and_stop_as_under_systemd(
    tmp_path: Path, test_bundle: Path, synth_dir: Path, systemd: Systemd
) -> None:
    # given the daemon started as systemd starts it
    manifest = BundleManifest.read(test_bundle)
    log = tmp_path / "agent.log"
    proc = start(write_config(tmp_path, test_bundle), log, systemd)
    try:
        # when it reports ready
        ready = systemd.wait_for("READY", "1", proc, log)
        log_at_ready = log.read_text()
        port = int(re.search(r"health on http://127\.0\.0\.1:(\d+)/", log_at_ready).group(1))  # type: ignore[union-attr]
        readyz = urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10).status
        before = scrape(f"http://127.0.0.1:{port}/metrics")

        # and three radiographs arrive
        images = sorted(synth_dir.glob("Castings/S*/*.png"))[:3]
        for i, image in enumerate(images):
            shutil.copy(image, tmp_path / "hot" / f"P{i}.png")
        wait_until(lambda: not list((tmp_path / "hot").glob("*.png")), proc, log)
        after = scrape(f"http://127.0.0.1:{port}/metrics")
        systemd.wait_for("WATCHDOG", "1", proc, log)

        # and it is stopped
        proc.send_signal(signal.SIGTERM)
        stopping = systemd.wait_for("STOPPING", "1", proc, log)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()

    # then systemd heard what the agent was doing while it loaded, and READY came once the bundle was
    # verified and the pipeline ran, naming the bundle
    assert systemd.messages[0] == {"STATUS": f"loading and verifying bundle {test_bundle}"}
    # (the engine logs "ready on" after the golden check; the pipeline, after opening the source)
    assert log_at_ready.index(f"version {manifest.version} ready on") < log_at_ready.index("pipeline started")
    assert "health on http://" in log_at_ready  # every service started before READY
    assert f"bundle {manifest.version}" in ready["STATUS"]
    assert readyz == 200
    # the metrics moved with the frames
    assert before[("lineside_results_total", ())] == 0
    assert after[("lineside_results_total", ())] == 3
    assert after[("lineside_stage_latency_seconds_count", (("stage", "total"),))] == 3
    assert after[("lineside_provider", (("provider", "CPUExecutionProvider"),))] == 1
    key = (
        "lineside_bundle_info",
        (("bundle_id", manifest.bundle_id), ("station", "cell-07"), ("version", manifest.version)),
    )
    assert after[key] == 1
    # a clean stop
    assert stopping["STATUS"] == "stopping" and code == 0, log.read_text()[-3000:]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3


def test_a_missing_bundle_never_reports_ready(tmp_path: Path, systemd: Systemd) -> None:
    # given a config naming a bundle that is not there
    log = tmp_path / "agent.log"
    proc = start(write_config(tmp_path, tmp_path / "no-bundle"), log, systemd)

    # when
    code = proc.wait(STARTUP_S)
    heard = []
    while True:
        try:
            heard.append(systemd.sock.recv(4096).decode())
        except TimeoutError:
            break

    # then exit 1 with a line naming the bundle, and systemd never heard READY
    assert code == 1
    assert f"cannot serve bundle {tmp_path / 'no-bundle'}" in log.read_text()
    assert not any("READY=1" in message for message in heard)
