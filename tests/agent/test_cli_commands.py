"""CLI commands: run (with a stand-in engine), batch prediction to a folder or S3 (moto), logging."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import lineside.agent.runtime
from lineside.agent.batch import predict_batch
from lineside.agent.cli import configure_logging, main
from lineside.agent.config import AgentConfig
from lineside.agent.storage import open_store


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    # The commands configure logging for the process; undo that after each test.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def inputs(tmp_path: Path, put_png: Callable[..., Path]) -> Path:
    folder = tmp_path / "in"
    (folder / "line2").mkdir(parents=True)
    put_png(folder / "a.png", value=10)
    put_png(folder / "line2" / "b.png", value=200)
    (folder / "c.png").write_bytes(b"not an image")
    (folder / "readme.txt").write_text("ignored")
    return folder


def test_predict_batch_writes_results_and_annotations_to_a_folder(
    inputs: Path, tmp_path: Path, make_inspector: Callable
) -> None:
    # given
    out = tmp_path / "out"

    # when
    images, errors = predict_batch(make_inspector(), open_store(str(inputs)), open_store(str(out)))

    # then
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert (images, errors) == (3, 1)
    assert [row["frame_id"] for row in rows] == ["a.png", "c.png", "line2/b.png"]
    assert rows[1]["error"]["code"] == "decode_failed"
    assert sorted(p.name for p in (out / "annotated").iterdir()) == ["a.jpg", "line2_b.jpg"]


def test_predict_batch_twice_does_not_duplicate_results(inputs: Path, tmp_path: Path, make_inspector: Callable) -> None:
    # given
    out = tmp_path / "out"
    predict_batch(make_inspector(), open_store(str(inputs)), open_store(str(out)))

    # when
    predict_batch(make_inspector(), open_store(str(inputs)), open_store(str(out)), annotate=False)

    # then
    assert len((out / "results.jsonl").read_text().splitlines()) == 3


def test_predict_batch_reads_and_writes_s3_prefixes(s3_endpoint: str, inputs: Path, make_inspector: Callable) -> None:
    # given: the images uploaded under s3://xray/batch-7/
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="xray")
    for path in sorted(p for p in inputs.rglob("*") if p.is_file()):
        client.put_object(Bucket="xray", Key=f"batch-7/{path.relative_to(inputs).as_posix()}", Body=path.read_bytes())

    # when
    images, errors = predict_batch(
        make_inspector(), open_store("s3://xray/batch-7"), open_store("s3://xray/results/batch-7")
    )

    # then
    listed = client.list_objects_v2(Bucket="xray", Prefix="results/batch-7/")
    keys = sorted(item["Key"] for item in listed["Contents"])
    assert (images, errors) == (3, 1)
    assert keys == [
        "results/batch-7/annotated/a.jpg",
        "results/batch-7/annotated/line2_b.jpg",
        "results/batch-7/results.jsonl",
    ]
    body = client.get_object(Bucket="xray", Key="results/batch-7/results.jsonl")["Body"].read().decode()
    assert len(body.splitlines()) == 3


def test_inspect_with_a_missing_bundle_exits_1_with_a_message(
    tmp_path: Path, put_png: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    # given
    image = put_png(tmp_path / "x.png")

    # when
    code = main(["inspect", "--bundle", str(tmp_path / "no-bundle"), str(image)])

    # then
    assert code == 1
    assert "cannot load bundle" in capsys.readouterr().err


@pytest.mark.parametrize(("env", "has_time"), [({"INVOCATION_ID": "abc"}, False), ({}, True)])
def test_log_lines_carry_timestamps_only_outside_systemd(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], has_time: bool
) -> None:
    # given
    for name in ("INVOCATION_ID", "JOURNAL_STREAM"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    # when
    configure_logging("INFO")
    fmt = logging.getLogger().handlers[0].formatter._fmt  # type: ignore[union-attr]

    # then
    assert ("%(asctime)s" in (fmt or "")) is has_time


def test_run_serves_a_finite_source_into_the_configured_sinks_and_exits_0(
    inputs: Path, tmp_path: Path, make_inspector: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given: a replay config; the engine is replaced by the recording stand-in (no bundle here)
    engine = make_inspector()
    asked: dict[str, object] = {}

    def fake_load(config: AgentConfig, report: object = None) -> object:
        asked.update(providers=list(config.inference.providers), bundle=config.bundle.path)
        return engine

    monkeypatch.setattr(lineside.agent.runtime, "load_engine", fake_load)
    results = tmp_path / "results.jsonl"
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"""
station: test
bundle: {{path: {tmp_path / "bundle"}}}
inference: {{providers: [cuda, cpu], require_gpu: false}}
source: {{kind: replay, path: {inputs}, loop: true, max_frames: 6}}
sinks:
  - {{kind: jsonl, path: {results}}}
  - {{kind: annotate, folder: {tmp_path / "ann"}}}
health: {{port: 0}}
"""
    )

    # when
    code = main(["run", "--config", str(config)])

    # then
    assert code == 0
    assert asked["providers"] == ["cuda", "cpu"]
    assert asked["bundle"] == tmp_path / "bundle"
    assert len(results.read_text().splitlines()) == 6
    assert engine.closed
