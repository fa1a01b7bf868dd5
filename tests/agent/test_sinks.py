"""The jsonl and annotate sinks, and the sink registry."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from lineside.agent.errors import ConfigError
from lineside.agent.results import Frame, InspectionResult, ResultBox, result_id_for
from lineside.agent.sinks import AnnotateSink, AnnotateSinkConfig, JsonlSink, JsonlSinkConfig, create_sink
from lineside.agent.sinks.annotate import to_display


def make_frame(name: str, image: np.ndarray | None = None) -> Frame:
    return Frame(
        frame_id=name,
        key=f"{name}:0",
        source="test",
        image=image,
        captured_wall=datetime.now(UTC),
        captured_mono=0.0,
        meta={"file": name},
    )


def make_result(frame: Frame, *, defective: bool = True, score: float = 0.8) -> InspectionResult:
    return InspectionResult(
        result_id=result_id_for(frame.station, frame.source, frame.key),
        frame_id=frame.frame_id,
        source=frame.source,
        captured_at=frame.captured_wall,
        inspected_at=datetime.now(UTC),
        is_defective=defective,
        score=score,
        bundle_version="2026.01.01-1",
        boxes=[
            ResultBox(x1=5, y1=5, x2=20, y2=15, score=0.9, source="ssd"),
            ResultBox(x1=30, y1=20, x2=50, y2=40, score=0.7, source="vae"),
        ],
    )


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_jsonl_writes_one_json_object_per_line(tmp_path: Path) -> None:
    # given
    path = tmp_path / "out" / "results.jsonl"
    sink = create_sink(JsonlSinkConfig(kind="jsonl", path=str(path), fsync=True))
    frames = [make_frame(f"f{i}.png") for i in range(3)]

    # when
    for frame in frames:
        sink.publish(make_result(frame), frame)
    sink.close()

    # then
    rows = lines_of(path)
    assert [row["frame_id"] for row in rows] == ["f0.png", "f1.png", "f2.png"]
    assert all(row["schema_version"] == 1 for row in rows)
    assert sink.durable


def test_jsonl_does_not_write_a_result_id_again_after_reopening(tmp_path: Path) -> None:
    # given: a file holding two results, as left by a process killed before its ledger write
    path = tmp_path / "results.jsonl"
    first = JsonlSink(path)
    a, b, c = (make_frame(n) for n in ("a.png", "b.png", "c.png"))
    first.publish(make_result(a), a)
    first.publish(make_result(b), b)
    first.close()

    # when: the restarted process re-inspects b and goes on with c
    second = JsonlSink(path)
    second.publish(make_result(b), b)
    second.publish(make_result(c), c)
    second.publish(make_result(c), c)
    second.close()

    # then
    assert [row["frame_id"] for row in lines_of(path)] == ["a.png", "b.png", "c.png"]
    assert second.skipped_duplicates == 2


def test_jsonl_cuts_a_partial_last_line_left_by_a_crash(tmp_path: Path) -> None:
    # given
    path = tmp_path / "results.jsonl"
    a, b = make_frame("a.png"), make_frame("b.png")
    path.write_text(make_result(a).model_dump_json() + "\n" + '{"result_id": "half-writ', encoding="utf-8")

    # when
    sink = JsonlSink(path)
    sink.publish(make_result(b), b)
    sink.close()

    # then: every line parses
    assert [row["frame_id"] for row in lines_of(path)] == ["a.png", "b.png"]


def test_jsonl_dash_writes_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    # given
    sink = JsonlSink("-")
    frame = make_frame("s.png")

    # when
    sink.publish(make_result(frame), frame)
    sink.close()

    # then
    assert json.loads(capsys.readouterr().out)["frame_id"] == "s.png"


def test_annotate_writes_a_readable_jpeg_of_the_image_size(tmp_path: Path) -> None:
    # given: a 16-bit image
    image = np.full((60, 80), 2000, dtype=np.uint16)
    image[10:30, 10:30] = 40000
    frame = make_frame("part 1/view:2.tif", image)
    sink = create_sink(AnnotateSinkConfig(kind="annotate", folder=tmp_path / "ann", jpeg_quality=80))

    # when
    sink.publish(make_result(frame), frame)

    # then
    (written,) = (tmp_path / "ann").iterdir()
    assert written.name == "part_1_view_2.jpg"
    decoded = cv2.imread(str(written), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape == (60, 80, 3)
    assert not sink.durable


def test_annotate_only_defective_skips_good_parts_and_error_frames(tmp_path: Path) -> None:
    # given
    sink = AnnotateSink(tmp_path / "ann", only_defective=True)
    good = make_frame("good.png", np.zeros((32, 32), np.uint8))
    bad = make_frame("bad.png", np.zeros((32, 32), np.uint8))
    undecodable = make_frame("broken.png", None)

    # when
    sink.publish(make_result(good, defective=False, score=0.1), good)
    sink.publish(make_result(bad), bad)
    sink.publish(make_result(undecodable), undecodable)

    # then
    assert sorted(p.name for p in (tmp_path / "ann").iterdir()) == ["bad.jpg"]


def test_sixteen_bit_display_window_uses_the_full_eight_bit_range() -> None:
    # given
    ramp = np.linspace(1000, 5000, 64 * 64).astype(np.uint16).reshape(64, 64)

    # when
    shown = to_display(ramp)

    # then
    assert shown.dtype == np.uint8
    assert shown.min() == 0 and shown.max() == 255


def test_sink_registry_rejects_an_unknown_kind() -> None:
    # given
    class Other:
        kind = "mqtt"

    # when / then
    with pytest.raises(ConfigError, match="unknown sink kind 'mqtt'"):
        create_sink(Other())  # type: ignore[arg-type]
