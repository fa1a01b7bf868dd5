"""Session fixtures shared by every suite: synthetic X-rays and a real bundle from our export stage.

In the full environment (.venv, MXNet present) the bundle is trained and built here, for real, from
synthetic data. In the agent-only environment (.venv-agent, no MXNet) the suite reuses the bundle the
first run left at $LINESIDE_TEST_BUNDLE: the agent never needs MXNet, not even in its tests.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lineside.agent.results import Frame, InspectionResult
from lineside.agent.sinks.base import Sink

REPO = Path(__file__).resolve().parents[1]
HAS_MXNET = importlib.util.find_spec("mxnet") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import subprocess

    try:
        has_gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        has_gpu = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi found none)"))


class RecordingSink(Sink):
    """Records what it is given; raises on every call when `fail` is set."""

    def __init__(self, name: str = "recording", *, fail: bool = False, durable: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.durable = durable
        self.results: list[InspectionResult] = []
        self.closed = False

    def publish(self, result: InspectionResult, frame: Frame) -> None:
        if self.fail:
            raise OSError("disk full (simulated)")
        self.results.append(result)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def make_sink() -> type[RecordingSink]:
    """RecordingSink(name, fail=..., durable=...)."""
    return RecordingSink


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 small synthetic radiographs (286x384) in the GDXray layout, 8-bit."""
    from lineside.export.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, images=48, seed=3, size=(286, 384), images_per_series=8)
    return out


@pytest.fixture(scope="session")
def trained_runs(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model trained for a few real MXNet iterations on the synthetic set.

    With $LINESIDE_TEST_RUNS (and $LINESIDE_TEST_BUNDLE) pointing at what an earlier full run left in
    build/ (mutation testing does this), those runs are reused instead of trained again.
    """
    if not HAS_MXNET:
        pytest.skip("MXNet is not installed in this environment (agent-only venv)")
    given = os.environ.get("LINESIDE_TEST_RUNS")
    if given and os.environ.get("LINESIDE_TEST_BUNDLE"):
        from lineside.export.models import EXPORT_KINDS as kinds

        found = {kind: Path(given) / kind for kind in kinds}
        if all((run / "train.json").is_file() for run in found.values()):
            return found
    from lineside.export.data import datasets_for
    from lineside.export.models import EXPORT_KINDS
    from lineside.export.train import TrainOptions

    _, train, val, _test, split = datasets_for(str(synth_dir), None)
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for kind, handler in EXPORT_KINDS.items():
        # 20 steps: enough for scores that differ from image to image, with golden verdicts clear of the boundary
        opts = TrainOptions(out=root / kind, epochs=2, iters_per_epoch=10, batch_size=4, val_batches=2, seed=1)
        runs[kind] = handler.train(train, val, opts, split)
    export_to = os.environ.get("LINESIDE_EXPORT_TEST_RUNS_TO")
    if export_to:
        shutil.rmtree(export_to, ignore_errors=True)
        shutil.copytree(root, export_to)
    return runs


@pytest.fixture(scope="session")
def test_bundle(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A verified bundle folder built by `export.build` (or the one a full run left behind)."""
    given = os.environ.get("LINESIDE_TEST_BUNDLE")
    if HAS_MXNET and given and os.environ.get("LINESIDE_TEST_RUNS") and (Path(given) / "manifest.json").is_file():
        return Path(given)  # built from $LINESIDE_TEST_RUNS by an earlier full run
    if not HAS_MXNET:
        if not given or not (Path(given) / "manifest.json").is_file():
            pytest.fail(
                "agent-only run needs LINESIDE_TEST_BUNDLE pointing to a bundle built by the full run "
                "(make test does this)"
            )
        return Path(given)
    from lineside.export.build import BuildOptions, build_bundle, dataset_summary
    from lineside.export.data import datasets_for

    runs: dict[str, Path] = request.getfixturevalue("trained_runs")
    synth: Path = request.getfixturevalue("synth_dir")
    dataset, train, val, test, _split = datasets_for(str(synth), None)
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    build_bundle(
        BuildOptions(
            out=out,
            calib=val,
            runs=dict(runs),
            dataset_summary=dataset_summary(dataset, train, val, test),
        )
    )
    export_to = os.environ.get("LINESIDE_EXPORT_TEST_BUNDLE_TO")
    if export_to:
        target = Path(export_to)
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(out, target)
    return out


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """One real S3 API over HTTP on loopback (moto server) for the session; the OS picks the port as it binds.

    moto keeps one state per process, so tests sharing it use their own bucket names.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_endpoint(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The S3 endpoint, with boto3 pointed at it through the environment (test credentials, no shared files)."""
    from lineside.agent.storage import reset_s3_client

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    reset_s3_client()
    try:
        yield s3_server
    finally:
        reset_s3_client()


# -- decompression bombs: valid, fully compressed images beyond the default pixel limit ---------------

BOMB_SIDE = 10_000  # 100 M pixels > DEFAULT_MAX_PIXELS (64 M)


def _png_bomb() -> bytes:
    """A valid 8-bit grey PNG of 10000 x 10000 black pixels (~100 KB), compressed row by row."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    compressor = zlib.compressobj(9)
    row = b"\0" * (BOMB_SIDE + 1)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(BOMB_SIDE)) + compressor.flush()
    header = struct.pack(">IIBBBBB", BOMB_SIDE, BOMB_SIDE, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _array_bomb(suffix: str) -> bytes:
    import io

    import cv2
    import numpy as np
    import tifffile

    image = np.zeros((9000, 8000), np.uint8)  # 72 M pixels
    if suffix == ".tif":
        buffer = io.BytesIO()
        tifffile.imwrite(buffer, image, compression="zlib")
        return buffer.getvalue()
    ok, encoded = cv2.imencode(suffix, image, [cv2.IMWRITE_JPEG_QUALITY, 10])
    assert ok
    return encoded.tobytes()


@pytest.fixture(scope="session")
def bombs() -> dict[str, bytes]:
    """Real decompression bombs by format: {'png', 'jpeg', 'tiff'} -> bytes (each well under 1 MB)."""
    found = {"png": _png_bomb(), "jpeg": _array_bomb(".jpg"), "tiff": _array_bomb(".tif")}
    assert all(len(data) < 1_000_000 for data in found.values()), {k: len(v) for k, v in found.items()}
    return found


# -- a real MQTT broker (Debian's mosquitto) ---------------------------------------------------------


# Debian installs the broker in /usr/sbin, which a non-root PATH may lack.
MOSQUITTO = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin") or "mosquitto"


class Mosquitto:
    """A mosquitto process on a loopback port with a config file this class writes.

    mosquitto cannot take over a socket bound by someone else (no socket activation), so a port is
    chosen by binding port 0 and the broker then binds it itself; should another process take the port
    in between, mosquitto exits with "Address already in use" and `start` tries a new port (never a
    silent wrong broker). Restarts keep the port, so clients reconnect to the same address. Persistence
    is on: a subscriber's session and its queued QoS 1 messages survive a broker restart, as on a line.
    """

    def __init__(self, folder: Path, *, extra_conf: str = "") -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.extra_conf = extra_conf
        self.port = 0
        self.proc: Any = None
        self.log = folder / "mosquitto.log"

    @staticmethod
    def _free_port() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])

    def _ports(self) -> list[int]:
        """The main port and every extra `listener` in `extra_conf`."""
        extra = [int(p) for p in re.findall(r"^listener (\d+)", self.extra_conf, flags=re.MULTILINE)]
        return [self.port, *extra]

    def _write_conf(self) -> Path:
        conf = self.folder / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} 127.0.0.1",
                    # As root, mosquitto drops to the `mosquitto` user, who cannot write into the test's folders.
                    "user root" if os.geteuid() == 0 else "",
                    "allow_anonymous true" if "allow_anonymous" not in self.extra_conf else "",
                    "persistence true",
                    f"persistence_location {self.folder}/",
                    f"log_dest file {self.log}",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "log_type information",
                    "log_timestamp false",
                    self.extra_conf,
                    "",
                ]
            ),
            encoding="utf-8",
        )
        return conf

    def start(self, timeout: float = 30.0) -> Mosquitto:
        """Start (or restart on the same port) and wait until it accepts connections."""
        import subprocess
        import time

        for _ in range(5):
            if not self.port:
                self.port = self._free_port()
            offset = self.log.stat().st_size if self.log.exists() else 0
            conf = self._write_conf()
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                text = self.log.read_text(errors="replace")[offset:] if self.log.exists() else ""
                if self.proc.poll() is not None:
                    if "Address already in use" in text:
                        time.sleep(0.2)
                        break  # someone else has the port: try again (a new one when it was never ours)
                    raise RuntimeError(f"mosquitto exited with {self.proc.returncode}:\n{text}")
                # "Opening ... listen socket" is logged before each bind; "running" only once every listener
                # is open (a test's second, plain listener opened after the first one had been reported)
                opened = all(f"listen socket on port {port}" in text for port in self._ports())
                if opened and " running" in text:
                    return self
                time.sleep(0.02)
            else:
                self.proc.kill()
                raise RuntimeError(f"mosquitto did not open port {self.port} within {timeout:.0f} s")
        raise RuntimeError("mosquitto could not bind a port after 5 tries")

    def stop(self) -> None:
        """A clean stop (SIGTERM): the broker saves its persistence file."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    """Starts real mosquitto brokers: `mosquitto(extra_conf="...")`; all are stopped when the test ends."""
    if not Path(MOSQUITTO).is_file():
        pytest.fail("mosquitto is not installed (apt-get install -y mosquitto mosquitto-clients; make test does it)")
    started: list[Mosquitto] = []

    def start(extra_conf: str = "", name: str = "broker") -> Mosquitto:
        broker = Mosquitto(tmp_path / name, extra_conf=extra_conf)
        started.append(broker.start())
        return broker

    yield start
    for broker in started:
        broker.stop()


class Plc:
    """A subscriber acting as the line's PLC: a persistent session (QoS 1, clean_session false) on
    `<prefix>/#`, recording every message in arrival order; it also sends commands."""

    def __init__(
        self,
        port: int,
        prefix: str,
        *,
        client_id: str = "plc",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.prefix = prefix
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            client.subscribe(f"{prefix}/#", qos=1)

        def on_subscribe(client: Any, userdata: Any, mid: Any, reasons: Any, properties: Any) -> None:
            self.subscribed.set()

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            with self._lock:
                self.messages.append((message.topic, message.payload, bool(message.retain)))
                self.last_properties = message.properties

        self.client.on_connect = on_connect
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        connect_props = Properties(PacketTypes.CONNECT)
        connect_props.SessionExpiryInterval = 3600  # the session (and its queued messages) outlives a broker restart
        self.client.connect("127.0.0.1", port, clean_start=False, properties=connect_props)
        self.client.loop_start()
        if not self.subscribed.wait(15):
            raise RuntimeError("the PLC subscriber could not subscribe")

    def on(self, name: str) -> list[bytes]:
        """Payloads received on `<prefix>/<name>`, in arrival order."""
        topic = f"{self.prefix}/{name}"
        with self._lock:
            return [payload for t, payload, _ in self.messages if t == topic]

    def json_on(self, name: str) -> list[dict[str, Any]]:
        import json

        return [json.loads(p) for p in self.on(name)]

    def result_ids(self) -> list[str]:
        """Result ids in order of first arrival (the PLC de-duplicates redeliveries on them)."""
        seen: dict[str, None] = {}
        for item in self.json_on("result"):
            seen.setdefault(item["result_id"], None)
        return list(seen)

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.02)

    def send(self, command: str, payload: bytes | str, properties: Any = None) -> None:
        self.client.publish(f"{self.prefix}/cmd/{command}", payload, qos=1, properties=properties)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def plc() -> Iterator[Callable[..., Plc]]:
    """`plc(port, prefix)` -> a subscribed Plc; disconnected when the test ends."""
    made: list[Plc] = []

    def make(port: int, prefix: str, **kwargs: Any) -> Plc:
        made.append(Plc(port, prefix, **kwargs))
        return made[-1]

    yield make
    for item in made:
        item.close()
