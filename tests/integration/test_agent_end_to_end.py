"""The agent CLI as real processes on CPU with a real bundle: inspect, run (hot folder), crash and
restart, config errors, a tampered bundle, and batch prediction to a folder and to S3 (moto server).

Every process is started as `python -m lineside.agent.cli` with the interpreter running the tests, so the venv
under test (full or agent-only) is the one exercised.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from lineside.agent.bundle.manifest import BundleManifest
from lineside.agent.results import InspectionResult

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXIT_IMAGE_ERRORS = 3
EXIT_CONFIG = 78
STARTUP_S = 60.0  # bundle verification, session creation, warm-up and golden check on a busy CPU


# -- helpers --------------------------------------------------------------------------------------


def agent_env(**extra: str) -> dict[str, str]:
    """The test's environment, unbuffered, without anything that would make the agent think it runs
    under systemd or reach a real AWS account."""
    env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "JOURNAL_STREAM", "AWS_PROFILE")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def agent(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run `python -m lineside.agent.cli ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "lineside.agent.cli", *map(str, args)],
        cwd=REPO,
        env=env or agent_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_results(lines: str) -> list[InspectionResult]:
    return [InspectionResult.model_validate_json(line) for line in lines.splitlines() if line.strip()]


def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def encode_png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def write_config(tmp_path: Path, bundle: Path, *, settle_seconds: float, annotate: bool = False) -> Path:
    """An agent config modelled on deploy/agent.example.yaml, with every folder under tmp_path."""
    sinks: list[dict[str, Any]] = [
        {"kind": "jsonl", "path": str(tmp_path / "results.jsonl"), "fsync": True, "durable": True}
    ]
    if annotate:
        sinks.append({"kind": "annotate", "folder": str(tmp_path / "annotated"), "jpeg_quality": 85})
    config = {
        "station": "cell-07",
        "bundle": {"path": str(bundle)},
        "inference": {"providers": ["cpu"], "verify_golden": True},
        "source": {
            "kind": "folder",
            "path": str(tmp_path / "hot"),
            "done_dir": str(tmp_path / "done"),
            "failed_dir": str(tmp_path / "failed"),
            "state_dir": str(tmp_path / "state"),
            "settle_seconds": settle_seconds,
            "poll_interval": 0.1,
            "retry_seconds": 1,
            "patterns": ["*.png"],
            "part_id_regex": r"^(?P<part>[A-Z0-9]+)_v(?P<view>\d+)",
        },
        "queue": {"capacity": 4, "policy": "block"},
        "sinks": sinks,
        "log_level": "INFO",
        "health": {"port": 0},  # tests run side by side: never the fixed 9464
    }
    (tmp_path / "hot").mkdir(exist_ok=True)
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def images(synth_dir: Path) -> list[Path]:
    """The synthetic radiographs (286 x 384, 8-bit grey)."""
    found = sorted(synth_dir.glob("Castings/S*/*.png"))
    assert len(found) >= 30
    return found


@pytest.fixture(scope="module")
def manifest(test_bundle: Path) -> BundleManifest:
    return BundleManifest.read(test_bundle)


def assert_good(result: InspectionResult, image_path: Path, manifest: BundleManifest) -> None:
    """A successful result on the real bundle, on CPU, with boxes inside the image."""
    height, width = cv2.imread(str(image_path), cv2.IMREAD_UNCHANGED).shape[:2]
    assert result.error is None, result.error
    assert isinstance(result.is_defective, bool)
    assert result.score is not None and 0.0 <= result.score <= 1.0
    assert result.is_defective == (result.score >= 0.5)
    assert (result.width, result.height) == (width, height)
    for box in result.boxes:
        assert 0 <= box.x1 < box.x2 <= width and 0 <= box.y1 < box.y2 <= height
    assert result.bundle_id == manifest.bundle_id
    assert result.bundle_version == manifest.version
    assert result.providers == ["CPUExecutionProvider"]


# -- inspect --------------------------------------------------------------------------------------


def test_inspect_writes_one_result_per_file_and_flags_every_bad_one(
    tmp_path: Path, test_bundle: Path, manifest: BundleManifest, images: list[Path], bombs: dict[str, bytes]
) -> None:
    # given good images (synthetic, a golden one, a 16-bit one) and bad ones of every kind
    inputs = tmp_path / "in"
    inputs.mkdir()
    golden = test_bundle / manifest.golden[0].file.path
    grey = cv2.imread(str(images[0]), cv2.IMREAD_UNCHANGED)
    (inputs / "sixteen.png").write_bytes(encode_png(grey.astype(np.uint16) * 257))
    whole = images[2].read_bytes()
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (inputs / "notes.txt").write_text("operator notes, not an image\n", encoding="utf-8")
    (inputs / "bomb.png").write_bytes(bombs["jpeg"])  # a JPEG bomb named .png
    (inputs / "colour.png").write_bytes(encode_png(np.dstack([grey, 255 - grey, grey // 2])))
    good = {"a.png": images[0], "b.png": images[1], "golden.png": golden, "sixteen.png": images[0]}
    for name in ("a.png", "b.png", "golden.png"):
        shutil.copy(good[name], inputs / name)
    expected_errors = {
        "empty.png": "empty",
        "truncated.png": "decode_failed",
        "notes.txt": "decode_failed",
        "bomb.png": "too_large",
        "colour.png": "bad_channels",
    }
    order = [
        *("a.png", "empty.png", "b.png", "truncated.png", "notes.txt"),
        *("golden.png", "bomb.png", "colour.png", "sixteen.png"),
    ]

    # when
    done = agent(
        "inspect", "--bundle", test_bundle, "--providers", "cpu", "--annotate", tmp_path / "annotated",
        *(inputs / name for name in order),
    )  # fmt: skip

    # then one result per input, in input order; bad ones carry their reason and no verdict
    assert done.returncode == EXIT_IMAGE_ERRORS, done.stderr[-3000:]
    results = read_results(done.stdout)
    assert [r.meta["file"] for r in results] == order
    by_name = {r.meta["file"]: r for r in results}
    for name, code in expected_errors.items():
        result = by_name[name]
        assert result.error is not None and result.error.code == code, (name, result.error)
        assert result.is_defective is None and result.score is None and result.boxes == []
    for name, path in good.items():
        assert_good(by_name[name], path, manifest)
    # the 16-bit copy is the same radiograph: the same verdict as its 8-bit original
    assert by_name["sixteen.png"].is_defective == by_name["a.png"].is_defective
    assert by_name["sixteen.png"].score == pytest.approx(by_name["a.png"].score, abs=0.02)
    # an annotated, readable JPEG for every decodable image, none for the others
    annotated = sorted(p.name for p in (tmp_path / "annotated").iterdir())
    assert annotated == sorted(Path(name).stem + ".jpg" for name in good)
    for name, path in good.items():
        jpeg = cv2.imread(str(tmp_path / "annotated" / (Path(name).stem + ".jpg")))
        assert jpeg is not None and jpeg.shape == (*cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).shape, 3)


def test_inspect_with_default_providers_keeps_stdout_for_results_only(
    tmp_path: Path, test_bundle: Path, manifest: BundleManifest, images: list[Path]
) -> None:
    # given the default provider order (TensorRT, CUDA, CPU), as a new user runs it; on a machine
    # without CUDA libraries ONNX Runtime would fall back and print banners
    paths = [images[0], images[1], test_bundle / manifest.golden[0].file.path]

    # when
    done = agent("inspect", "--bundle", test_bundle, *paths)

    # then every stdout line is one JSON result (what `| jq .` needs), and stderr says in one line
    # which providers run and why the others were skipped
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(paths)
    results = [InspectionResult.model_validate(json.loads(line)) for line in lines]
    assert [r.meta["file"] for r in results] == [p.name for p in paths]
    provider_lines = [line for line in done.stderr.splitlines() if "execution providers:" in line]
    assert len(provider_lines) <= 1
    if "CUDAExecutionProvider" not in results[0].providers:
        assert len(provider_lines) == 1 and "cuda skipped:" in provider_lines[0], done.stderr
    assert "EP Error" not in done.stderr + done.stdout


# -- run: hot folder ------------------------------------------------------------------------------


def test_run_inspects_a_hot_folder_once_per_file_and_outlives_bad_files(
    tmp_path: Path,
    test_bundle: Path,
    manifest: BundleManifest,
    images: list[Path],
    daemons: Callable,
    bombs: dict[str, bytes],
) -> None:
    # given bad files already waiting in the hot folder (oldest first, so they are met first)
    config = write_config(tmp_path, test_bundle, settle_seconds=1.5, annotate=True)
    hot = tmp_path / "hot"
    bad = {"E1_v1.png": "empty", "T1_v1.png": "decode_failed", "X1_v1.png": "decode_failed", "B1_v1.png": "too_large"}
    (hot / "E1_v1.png").write_bytes(b"")
    (hot / "T1_v1.png").write_bytes(images[0].read_bytes()[:3000])
    (hot / "X1_v1.png").write_text("not an image\n", encoding="utf-8")
    (hot / "B1_v1.png").write_bytes(bombs["png"])
    shutil.copy(images[1], hot / "P1_v1.png")
    for age, name in enumerate(sorted(bad)):
        os.utime(hot / name, (time.time() - 100 + age,) * 2)

    # when the daemon runs and images arrive while it runs: plainly, slowly (in two halves), and as .tmp
    daemon = daemons(config, tmp_path / "agent.log")
    daemon.wait_for(lambda: pngs(hot) == [], "the files present at start")
    bad_done_at = line_count(tmp_path / "results.jsonl")
    shutil.copy(images[2], hot / "P2_v2.png")
    (hot / "P4_v1.png.tmp").write_bytes(images[4].read_bytes())
    data = images[3].read_bytes()
    with (hot / "P3_v1.png").open("wb") as fh:
        fh.write(data[: len(data) // 2])
    time.sleep(0.5)  # well under settle_seconds: the half file must not count as complete
    with (hot / "P3_v1.png").open("ab") as fh:
        fh.write(data[len(data) // 2 :])
    daemon.wait_for(lambda: pngs(hot) == [], "the files written while running")
    assert (hot / "P4_v1.png.tmp").exists()  # a .tmp is never picked up, however long it sits there
    os.rename(hot / "P4_v1.png.tmp", hot / "P4_v1.png")
    daemon.wait_for(lambda: pngs(hot) == [], "the renamed .tmp file")
    still_running = daemon.proc.poll() is None
    code = daemon.stop()

    # then the daemon kept serving after the bad files and stopped cleanly on SIGTERM
    assert still_running and code == 0, daemon.tail()
    assert bad_done_at == 5
    results = read_results((tmp_path / "results.jsonl").read_text(encoding="utf-8"))
    good = {"P1_v1.png": images[1], "P2_v2.png": images[2], "P3_v1.png": images[3], "P4_v1.png": images[4]}
    assert Counter(r.meta["file"] for r in results) == dict.fromkeys([*bad, *good], 1)
    by_name = {r.meta["file"]: r for r in results}
    for name, path in good.items():
        assert_good(by_name[name], path, manifest)
        assert (by_name[name].part_id, by_name[name].view) == (name.split("_")[0], int(name[-5]))
    assert pngs(tmp_path / "done") == sorted(good)
    assert (tmp_path / "done" / "P3_v1.png").read_bytes() == data
    # every bad file sits in failed/ next to a report naming the reason
    assert pngs(tmp_path / "failed") == sorted(bad)
    for name, code in bad.items():
        report = json.loads((tmp_path / "failed" / f"{name}.error.json").read_text(encoding="utf-8"))
        assert report["code"] == code and by_name[name].error is not None
        assert report["result_id"] == by_name[name].result_id
    assert sorted(p.name for p in (tmp_path / "annotated").glob("*.jpg")) == sorted(n[:-4] + ".jpg" for n in good)
    counters = daemon.counters()
    assert (counters["frames_in"], counters["results_out"], counters["errors"]) == (8, 8, 4)
    assert counters["acks"]["ok"] == 4 and counters["acks"]["failed"] == 4


def roll_back_last_ack(tmp_path: Path, *, drop_ledger_entry: bool) -> str:
    """Force the state a crash inside the last acknowledgement leaves; returns the file's name.

    The newest file in the ledger goes back to the hot folder (crash after the ledger append, before
    the move); with `drop_ledger_entry` its entry goes too (crash after the result line was written,
    before the ledger append). A real SIGKILL lands in these windows only by chance.
    """
    ledger = tmp_path / "state" / "ledger.jsonl"
    raw = ledger.read_bytes()
    lines = raw[: raw.rfind(b"\n") + 1].splitlines(keepends=True)  # a partial last line is no entry
    name = json.loads(lines[-1])["key"].split(":")[0]
    if drop_ledger_entry:
        ledger.write_bytes(b"".join(lines[:-1]))
    if (tmp_path / "done" / name).exists():
        os.rename(tmp_path / "done" / name, tmp_path / "hot" / name)
    return name


@pytest.mark.parametrize(
    ("kill_after", "drop_ledger_entry"),
    [pytest.param(4, False, id="early-unmoved"), pytest.param(14, True, id="late-unledgered")],
)
def test_run_inspects_every_file_exactly_once_across_a_crash(
    kill_after: int, drop_ledger_entry: bool, tmp_path: Path, test_bundle: Path, images: list[Path], daemons: Callable
) -> None:
    # given a hot folder holding 24 distinct images
    config = write_config(tmp_path, test_bundle, settle_seconds=0.2)
    hot = tmp_path / "hot"
    names = [f"P{i:04d}_v1.png" for i in range(24)]
    for name, path in zip(names, images[: len(names)], strict=True):
        shutil.copy(path, hot / name)
    results_path = tmp_path / "results.jsonl"

    # when the daemon is killed (SIGKILL) mid-stream, the last acknowledgement is cut short, and the
    # daemon is restarted with the same config
    first = daemons(config, tmp_path / "agent-1.log")
    first.wait_for(lambda: line_count(results_path) >= kill_after, f"{kill_after} results")
    first.stop(signal.SIGKILL)
    rolled_back = roll_back_last_ack(tmp_path, drop_ledger_entry=drop_ledger_entry)
    left_after_crash = pngs(hot)
    second = daemons(config, tmp_path / "agent-2.log")
    second.wait_for(lambda: pngs(hot) == [], "an empty hot folder after the restart", timeout=120)
    code = second.stop()

    # then the crash happened mid-stream, and still every file has exactly one result and one ledger entry
    assert rolled_back in left_after_crash and len(left_after_crash) < len(names) - 1
    assert code == 0, second.tail()
    raw = results_path.read_bytes()
    assert raw.endswith(b"\n")
    results = read_results(raw.decode("utf-8"))
    assert Counter(r.meta["file"] for r in results) == dict.fromkeys(names, 1)
    assert len({r.result_id for r in results}) == len(names)
    assert all(r.error is None for r in results)
    assert pngs(tmp_path / "done") == names
    assert not (tmp_path / "failed").exists() or pngs(tmp_path / "failed") == []
    ledger = [json.loads(line) for line in (tmp_path / "state" / "ledger.jsonl").read_text().splitlines()]
    assert sorted(entry["key"].split(":")[0] for entry in ledger) == names
    assert {entry["result_id"] for entry in ledger} == {r.result_id for r in results}
    # a file already in the ledger is moved, not inspected again
    recovered = second.counters()["source"].get("recovered", 0)
    assert recovered >= (0 if drop_ledger_entry else 1)


# -- configuration and bundle errors --------------------------------------------------------------


def test_bad_config_is_refused_with_every_key_path_and_exit_78(tmp_path: Path, test_bundle: Path) -> None:
    # given a config with an unknown key and a value of the wrong type
    (tmp_path / "hot").mkdir()
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"station: cell-07\n"
        f"bundle: {{path: {test_bundle}}}\n"
        f"source:\n  kind: folder\n  path: {tmp_path / 'hot'}\n  colour: red\n"
        f"queue:\n  capacity: lots\n",
        encoding="utf-8",
    )

    # when
    checked = agent("check-config", config, timeout=60)
    started = time.monotonic()
    ran = agent("run", "--config", config, timeout=60)
    run_s = time.monotonic() - started

    # then both commands name both problems by key path and exit 78; run starts nothing
    for done in (checked, ran):
        assert done.returncode == EXIT_CONFIG, done.stderr
        assert "source.colour: Extra inputs are not permitted" in done.stderr
        assert "queue.capacity:" in done.stderr and "'lots'" in done.stderr
    assert "starting" not in ran.stderr and run_s < 30
    assert sorted(p.name for p in (tmp_path / "hot").iterdir()) == []  # no done/, failed/ or ledger made


def test_run_refuses_a_tampered_bundle_naming_the_file(tmp_path: Path, test_bundle: Path, images: list[Path]) -> None:
    # given a copy of the bundle with one byte of a model changed, and an image waiting
    bundle = tmp_path / "bundle"
    shutil.copytree(test_bundle, bundle)
    model = BundleManifest.read(bundle).models["ssd"].file.path
    data = bytearray((bundle / model).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / model).write_bytes(bytes(data))
    config = write_config(tmp_path, bundle, settle_seconds=0.2)
    shutil.copy(images[0], tmp_path / "hot" / "P1_v1.png")

    # when
    started = time.monotonic()
    done = agent("run", "--config", config, timeout=60)
    elapsed = time.monotonic() - started

    # then it fails fast, names the file, and never touches the hot folder
    assert done.returncode == 1, done.stderr
    assert f"{model}: sha256 is" in done.stderr
    assert elapsed < 30
    assert pngs(tmp_path / "hot") == ["P1_v1.png"] and not (tmp_path / "results.jsonl").exists()


# -- predict --------------------------------------------------------------------------------------


def test_predict_writes_results_and_annotated_images_for_a_folder(
    tmp_path: Path, test_bundle: Path, manifest: BundleManifest, images: list[Path]
) -> None:
    # given a folder of images, one in a subfolder
    inputs, out = tmp_path / "in", tmp_path / "out"
    (inputs / "line2").mkdir(parents=True)
    sources = {"a.png": images[5], "b.png": images[6], "line2/c.png": images[7]}
    for name, path in sources.items():
        shutil.copy(path, inputs / name)

    # when
    done = agent("predict", "--bundle", test_bundle, "--providers", "cpu", "--input", inputs, "--output", out)

    # then
    assert done.returncode == 0, done.stderr[-3000:]
    results = read_results((out / "results.jsonl").read_text(encoding="utf-8"))
    assert sorted(r.meta["file"] for r in results) == sorted(sources)
    for result in results:
        assert_good(result, sources[result.meta["file"]], manifest)
    annotated = sorted(p.name for p in (out / "annotated").iterdir())
    assert annotated == ["a.jpg", "b.jpg", "line2_c.jpg"]
    assert all(cv2.imread(str(out / "annotated" / name)) is not None for name in annotated)


def test_predict_reads_from_and_writes_to_s3(
    tmp_path: Path, test_bundle: Path, manifest: BundleManifest, images: list[Path], s3_endpoint: str
) -> None:
    # given images uploaded under s3://xray-e2e/batch-7/ (moto shares state within a process: own bucket)
    import boto3

    creds = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket="xray-e2e")
    sources = {"a.png": images[8], "b.png": images[9], "line2/c.png": images[10]}
    for name, path in sources.items():
        client.put_object(Bucket="xray-e2e", Key=f"batch-7/{name}", Body=path.read_bytes())
    env = agent_env(
        AWS_ENDPOINT_URL=s3_endpoint,
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
        NO_PROXY="127.0.0.1,localhost",
        **creds,
    )

    # when
    done = agent(
        "predict", "--bundle", test_bundle, "--providers", "cpu",
        "--input", "s3://xray-e2e/batch-7", "--output", "s3://xray-e2e/results/batch-7",
        env=env,
    )  # fmt: skip

    # then the outputs are in the bucket: one result per image and readable annotated JPEGs
    assert done.returncode == 0, done.stderr[-3000:]
    listed = client.list_objects_v2(Bucket="xray-e2e", Prefix="results/batch-7/")
    keys = sorted(item["Key"] for item in listed["Contents"])
    assert keys == [
        "results/batch-7/annotated/a.jpg",
        "results/batch-7/annotated/b.jpg",
        "results/batch-7/annotated/line2_c.jpg",
        "results/batch-7/results.jsonl",
    ]
    body = client.get_object(Bucket="xray-e2e", Key="results/batch-7/results.jsonl")["Body"].read().decode("utf-8")
    results = read_results(body)
    assert sorted(r.meta["file"] for r in results) == sorted(sources)
    for result in results:
        assert_good(result, sources[result.meta["file"]], manifest)
    jpeg = client.get_object(Bucket="xray-e2e", Key="results/batch-7/annotated/line2_c.jpg")["Body"].read()
    height, width = cv2.imread(str(sources["line2/c.png"]), cv2.IMREAD_GRAYSCALE).shape
    assert cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape == (height, width, 3)
