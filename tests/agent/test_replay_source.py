"""The replay source, and the camera source against OpenCV's image-sequence reader."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from lineside.agent.errors import SourceError
from lineside.agent.sources import CameraSource, CameraSourceConfig, ReplaySource, ReplaySourceConfig, create_source


@pytest.fixture
def recorded(tmp_path: Path, put_png: Callable[..., Path]) -> Path:
    folder = tmp_path / "recorded"
    folder.mkdir()
    for name, value in (("b.png", 50), ("a.png", 10), ("c.tif.tmp", 0)):
        put_png(folder / name, value=value)
    (folder / "notes.txt").write_text("not an image")
    return folder


def start(config: ReplaySourceConfig) -> ReplaySource:
    source = create_source(config)
    assert isinstance(source, ReplaySource)
    source.start(threading.Event())
    return source


def test_one_pass_in_name_order_without_loop(recorded: Path) -> None:
    # given
    source = start(ReplaySourceConfig(kind="replay", path=recorded))

    # when
    frames = list(source.frames())

    # then
    assert [f.frame_id for f in frames] == ["0:a.png", "0:b.png"]
    assert all(f.error is None for f in frames)


def test_looping_stops_at_max_frames_with_a_distinct_key_per_frame(recorded: Path) -> None:
    # given
    source = start(ReplaySourceConfig(kind="replay", path=recorded, loop=True, max_frames=5))

    # when
    frames = list(source.frames())

    # then
    assert [f.frame_id for f in frames] == ["0:a.png", "0:b.png", "1:a.png", "1:b.png", "2:a.png"]
    assert len({f.result_id for f in frames}) == 5
    assert source.snapshot()["frames"] == 5


def test_each_image_is_decoded_once_and_shared_read_only(recorded: Path) -> None:
    # given
    source = start(ReplaySourceConfig(kind="replay", path=recorded, loop=True, max_frames=4))

    # when
    first_a, _, second_a, _ = list(source.frames())

    # then
    assert first_a.image is second_a.image
    assert second_a.decode_ms == 0.0
    assert first_a.image is not None and not first_a.image.flags.writeable


def test_rate_limits_the_pace(recorded: Path) -> None:
    # given 4 frames at 20 Hz
    source = start(ReplaySourceConfig(kind="replay", path=recorded, loop=True, max_frames=4, rate_hz=20))

    # when
    frames = list(source.frames())

    # then no frame came before its slot (frame k at k x 50 ms after the first; a late frame lets the
    # next one catch up, so gaps alone may be shorter; how late a loaded machine is, is not this test's business)
    assert len(frames) == 4
    since_first = np.asarray([f.captured_mono for f in frames]) - frames[0].captured_mono
    assert all(t >= k * 0.05 - 0.01 for k, t in enumerate(since_first)), since_first  # 10 ms: decoding


def test_stop_event_ends_an_endless_replay(recorded: Path) -> None:
    # given
    source = ReplaySource(ReplaySourceConfig(kind="replay", path=recorded, loop=True, rate_hz=50))
    stop = threading.Event()
    source.start(stop)
    frames = source.frames()

    # when
    next(frames)
    stop.set()

    # then
    assert list(frames) == []


def test_a_folder_without_images_is_a_source_error(tmp_path: Path) -> None:
    # given
    source = ReplaySource(ReplaySourceConfig(kind="replay", path=tmp_path))

    # when / then
    with pytest.raises(SourceError, match="no images"):
        source.start(threading.Event())


def test_camera_reads_grey_frames_and_reconnects_when_the_stream_ends(tmp_path: Path) -> None:
    # given: OpenCV's image-sequence reader stands in for a stream: colour frames, then end of stream
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"f_{i:02d}.png"), np.full((20, 30, 3), 40 * (i + 1), np.uint8))
    config = CameraSourceConfig(
        kind="camera",
        uri=str(tmp_path / "f_%02d.png"),
        reconnect_min_s=0.01,
        reconnect_max_s=0.02,
        max_read_failures=1,
    )
    source = create_source(config)
    assert isinstance(source, CameraSource)
    stop = threading.Event()
    source.start(stop)

    # when: more frames are read than one pass of the stream holds
    frames = []
    for frame in source.frames():
        frames.append(frame)
        if len(frames) == 5:
            stop.set()
    source.close()

    # then
    assert len(frames) == 5
    assert all(f.image is not None and f.image.shape == (20, 30) for f in frames)
    assert [int(f.image[0, 0]) for f in frames if f.image is not None] == [40, 80, 120, 40, 80]
    assert len({f.key for f in frames}) == 5
    counters = source.snapshot()
    assert counters["reconnects"] >= 1
    assert counters["read_failures"] >= 1
