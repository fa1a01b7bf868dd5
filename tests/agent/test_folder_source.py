"""The hot-folder source: completeness, ordering, failures, part ids, and exactly-once via the ledger."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from lineside.agent.errors import SourceError
from lineside.agent.results import Frame, FrameError
from lineside.agent.sources import FolderSourceConfig, create_source
from lineside.agent.sources.folder import LEDGER_NAME, FolderSource, Ledger, LedgerEntry


def make_source(hot: Path, **overrides: object) -> FolderSource:
    settings: dict[str, object] = {
        "kind": "folder",
        "path": hot,
        "settle_seconds": 0.0,
        "poll_interval": 0.02,
    }
    settings.update(overrides)
    source = create_source(FolderSourceConfig.model_validate(settings))
    assert isinstance(source, FolderSource)
    return source


class Runner:
    """Drives `frames()` on a thread, as the pipeline's capture thread does."""

    def __init__(self, source: FolderSource) -> None:
        self.source = source
        self.stop = threading.Event()
        self.frames: queue.Queue[Frame] = queue.Queue()
        source.start(self.stop)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for frame in self.source.frames():
            self.frames.put(frame)

    def take(self, n: int, timeout: float = 5.0) -> list[Frame]:
        return [self.frames.get(timeout=timeout) for _ in range(n)]

    def nothing_within(self, seconds: float) -> bool:
        try:
            self.frames.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.source.close()


@pytest.fixture
def hot(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "hot"
    folder.mkdir()
    yield folder


def test_a_file_still_being_written_is_not_picked_up_until_it_settles(
    hot: Path, make_png: Callable[..., bytes]
) -> None:
    # given: a PNG arriving in chunks, slower than the settle time would allow
    data = make_png(64, 64, value=7)
    runner = Runner(make_source(hot, settle_seconds=0.4))
    path = hot / "growing.png"
    try:
        with open(path, "wb") as fh:
            for start in range(0, len(data), max(1, len(data) // 6)):
                fh.write(data[start : start + max(1, len(data) // 6)])
                fh.flush()
                # when: it is still growing
                # then: nothing is delivered
                assert runner.nothing_within(0.15)

        # when: writing stopped
        (frame,) = runner.take(1)

        # then: the whole file is delivered once, decoded
        assert frame.error is None
        assert frame.meta["size"] == len(data)
        assert frame.image is not None and frame.image.shape == (64, 64)
        assert runner.nothing_within(0.3)
    finally:
        runner.close()


def test_temporary_partial_and_hidden_files_are_ignored(hot: Path, put_png: Callable[..., Path]) -> None:
    # given
    for name in ("a.png.tmp", "b.png.part", "c.PNG.partial", ".d.png", "notes.txt"):
        put_png(hot / name)
    put_png(hot / "real.png")
    runner = Runner(make_source(hot))
    try:
        # when
        (frame,) = runner.take(1)

        # then
        assert frame.frame_id == "real.png"
        assert runner.nothing_within(0.3)
    finally:
        runner.close()


def test_files_are_delivered_oldest_first(hot: Path, put_png: Callable[..., Path]) -> None:
    # given: names in the opposite order of their modification times
    now = time.time()
    for age, name in enumerate(["c.png", "b.png", "a.png"]):
        path = put_png(hot / name, value=age)
        os.utime(path, (now - 100 + age, now - 100 + age))
    runner = Runner(make_source(hot))
    try:
        # when
        frames = runner.take(3)

        # then
        assert [f.frame_id for f in frames] == ["c.png", "b.png", "a.png"]
    finally:
        runner.close()


def test_an_undecodable_file_becomes_an_error_frame_and_goes_to_failed_with_reason(hot: Path) -> None:
    # given
    (hot / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    source = make_source(hot)
    runner = Runner(source)
    try:
        # when
        (frame,) = runner.take(1)
        source.ack(frame, ok=False, reason=frame.error)

        # then
        assert frame.image is None
        assert frame.error is not None and frame.error.code == "decode_failed"
        assert not (hot / "broken.png").exists()
        assert (source.failed_dir / "broken.png").exists()
        report = json.loads((source.failed_dir / "broken.png.error.json").read_text())
        assert report["code"] == "decode_failed"
        assert "broken.png" in report["message"]
        assert report["result_id"] == frame.result_id
    finally:
        runner.close()


def test_ack_ok_moves_image_and_sidecar_to_done(hot: Path, put_png: Callable[..., Path]) -> None:
    # given
    put_png(hot / "P1_v1.png")
    (hot / "P1_v1.json").write_text(json.dumps({"part_id": "SERIAL-9", "view": 3, "line": "A"}))
    source = make_source(hot, part_id_regex=r"^(?P<part>[A-Z0-9]+)_v(?P<view>\d+)")
    runner = Runner(source)
    try:
        # when
        (frame,) = runner.take(1)
        source.ack(frame, ok=True)

        # then: the sidecar wins over the file name, and moves along
        assert (frame.part_id, frame.view) == ("SERIAL-9", 3)
        assert frame.meta["sidecar"] == {"line": "A"}
        assert sorted(p.name for p in source.done_dir.iterdir()) == ["P1_v1.json", "P1_v1.png"]
        assert sorted(p.name for p in hot.iterdir() if p.is_file()) == []
    finally:
        runner.close()


def test_part_id_and_view_come_from_the_file_name_regex(hot: Path, put_png: Callable[..., Path]) -> None:
    # given
    put_png(hot / "CAST42_v7_2026.png")
    put_png(hot / "unrelated.png")
    source = make_source(hot, part_id_regex=r"^(?P<part>[A-Z0-9]+)_v(?P<view>\d+)")
    runner = Runner(source)
    try:
        # when
        frames = {f.frame_id: f for f in runner.take(2)}

        # then
        assert (frames["CAST42_v7_2026.png"].part_id, frames["CAST42_v7_2026.png"].view) == ("CAST42", 7)
        assert (frames["unrelated.png"].part_id, frames["unrelated.png"].view) == (None, None)
        assert source.snapshot()["name_unmatched"] == 1
    finally:
        runner.close()


def test_an_invalid_sidecar_is_an_error_frame_not_a_silent_skip(hot: Path, put_png: Callable[..., Path]) -> None:
    # given
    put_png(hot / "x.png")
    (hot / "x.json").write_text("{not json")
    runner = Runner(make_source(hot))
    try:
        # when
        (frame,) = runner.take(1)

        # then
        assert frame.error is not None and frame.error.code == "bad_sidecar"
    finally:
        runner.close()


def test_sixteen_bit_images_keep_their_depth_and_bits_stored(hot: Path, put_png: Callable[..., Path]) -> None:
    # given
    put_png(hot / "deep.png", value=3000, dtype=np.uint16)
    runner = Runner(make_source(hot, bits_stored=12))
    try:
        # when
        (frame,) = runner.take(1)

        # then
        assert frame.image is not None and frame.image.dtype == np.uint16
        assert frame.bits_stored == 12
    finally:
        runner.close()


def test_key_and_result_id_are_stable_for_the_same_bytes(hot: Path, put_png: Callable[..., Path]) -> None:
    # given
    put_png(hot / "same.png", value=9)
    first = Runner(make_source(hot))
    (frame_a,) = first.take(1)
    first.close()

    # when: a new source sees the same, unacknowledged file
    second = Runner(make_source(hot))
    try:
        (frame_b,) = second.take(1)
    finally:
        second.close()

    # then
    assert frame_a.key == frame_b.key
    assert frame_a.key.startswith("same.png:")
    assert frame_a.result_id == frame_b.result_id


def test_after_a_crash_files_in_the_ledger_are_moved_not_inspected_again(
    hot: Path, put_png: Callable[..., Path]
) -> None:
    # given: three files; the first acked normally, the second acked but "killed before the move"
    for name in ("a.png", "b.png", "c.png"):
        put_png(hot / name, value=ord(name[0]))
    now = time.time()
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        os.utime(hot / name, (now - 10 + i, now - 10 + i))
    source = make_source(hot)
    runner = Runner(source)
    frames = runner.take(3)
    source.ack(frames[0], ok=True)
    b_bytes = (hot / "b.png").read_bytes()
    source.ack(frames[1], ok=True)
    runner.stop.set()
    runner.thread.join(5)
    # The crash: the ledger has b, but b is still in the hot folder (the move never happened).
    (hot / "b.png").write_bytes(b_bytes)
    (source.done_dir / "b.png").unlink()
    source.close()  # c was never acknowledged

    # when: the service restarts over the same folders
    restarted = make_source(hot)
    runner2 = Runner(restarted)
    try:
        redelivered = runner2.take(1)
        quiet = runner2.nothing_within(0.3)
    finally:
        runner2.close()

    # then: only c is inspected again, with the same result id; b is finished without inspection
    assert [f.frame_id for f in redelivered] == ["c.png"]
    assert redelivered[0].result_id == frames[2].result_id
    assert quiet
    assert sorted(p.name for p in restarted.done_dir.iterdir()) == ["a.png", "b.png"]
    assert restarted.snapshot()["recovered"] == 1
    ledger = [json.loads(line) for line in (restarted.state_dir / LEDGER_NAME).read_text().splitlines()]
    assert [entry["result_id"] for entry in ledger] == [frames[0].result_id, frames[1].result_id]


def test_a_partial_ledger_line_from_a_crash_is_ignored(hot: Path, put_png: Callable[..., Path]) -> None:
    # given
    state = hot / ".lineside"
    state.mkdir()
    (state / LEDGER_NAME).write_text('{"key": "x.png:abc", "result_id": "r1", "ok": true}\n{"key": "y.p')
    put_png(hot / "y.png")

    # when
    runner = Runner(make_source(hot))
    try:
        (frame,) = runner.take(1)
    finally:
        runner.close()

    # then
    assert frame.frame_id == "y.png"
    assert (state / LEDGER_NAME).read_text().endswith("}\n")


def test_a_released_frame_is_offered_again(hot: Path, put_png: Callable[..., Path]) -> None:
    # given
    put_png(hot / "again.png")
    source = make_source(hot, retry_seconds=0.1)
    runner = Runner(source)
    try:
        (first,) = runner.take(1)
        assert runner.nothing_within(0.2)  # in flight: not offered twice

        # when
        source.release(first)
        (second,) = runner.take(1)

        # then
        assert second.key == first.key
        assert (hot / "again.png").exists()
    finally:
        runner.close()


def test_a_missing_hot_folder_is_a_source_error(tmp_path: Path) -> None:
    # given
    source = make_source(tmp_path / "absent")

    # when / then
    with pytest.raises(SourceError, match="does not exist"):
        source.start(threading.Event())


def test_a_symlink_gets_an_error_result_and_leaves_the_hot_folder(hot: Path, tmp_path: Path) -> None:
    # given a link in the hot folder pointing at a file elsewhere on the box
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for upload")
    (hot / "link.png").symlink_to(secret)
    source = make_source(hot)
    runner = Runner(source)
    try:
        # when
        (frame,) = runner.take(1)
        source.ack(frame, ok=False, reason=frame.error)

        # then it is refused by name, its target never read, and the link moved to failed/ with its reason
        assert frame.image is None and frame.error is not None
        assert frame.error.code == "symlink_refused" and str(secret) in frame.error.message
        assert not (hot / "link.png").is_symlink()
        assert (source.failed_dir / "link.png").is_symlink()
        report = json.loads((source.failed_dir / "link.png.error.json").read_text())
        assert report["code"] == "symlink_refused"
        assert secret.read_bytes() == b"not for upload"
    finally:
        runner.close()


def test_two_unreadable_files_of_one_name_keep_two_results_and_two_places_in_failed(
    hot: Path, put_png: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # given files named a.png that cannot be read (the OS refusing the read is simulated: tests run as root)
    original = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "a.png" and self.parent == hot:
            raise PermissionError(13, "Permission denied")
        return original(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    source = make_source(hot)
    runner = Runner(source)
    try:
        frames = []
        for value in (10, 200):
            # when one arrives, is refused, and a later one of the same name arrives
            put_png(hot / "a.png", value=value)
            os.utime(hot / "a.png", ns=(value * 10**9, value * 10**9))
            (frame,) = runner.take(1)
            source.ack(frame, ok=False, reason=frame.error)
            frames.append(frame)

        # then: two error results with distinct ids, both files kept in failed/ with their own report
        assert [f.error.code for f in frames if f.error] == ["unreadable", "unreadable"]
        assert frames[0].result_id != frames[1].result_id
        kept = sorted(p.name for p in source.failed_dir.iterdir() if not p.name.endswith(".error.json"))
        assert len(kept) == 2 and "a.png" in kept
        reports = [json.loads(p.read_text()) for p in source.failed_dir.glob("*.error.json")]
        assert sorted(r["result_id"] for r in reports) == sorted(f.result_id for f in frames)
    finally:
        runner.close()


def test_a_reused_name_never_overwrites_done(hot: Path, put_png: Callable[..., Path]) -> None:
    # given done/ already holds a.png
    source = make_source(hot)
    runner = Runner(source)
    try:
        put_png(hot / "a.png", value=10)
        (first,) = runner.take(1)
        source.ack(first, ok=True)
        before = (source.done_dir / "a.png").read_bytes()

        # when another file named a.png is inspected
        put_png(hot / "a.png", value=90)
        (second,) = runner.take(1)
        source.ack(second, ok=True)

        # then both are kept
        assert (source.done_dir / "a.png").read_bytes() == before
        assert len(list(source.done_dir.glob("a.*.png"))) == 1
    finally:
        runner.close()


def test_results_of_one_file_at_two_stations_have_different_ids(hot: Path, put_png: Callable[..., Path]) -> None:
    # given the same file seen by sources of two stations (same default source name)
    put_png(hot / "a.png")
    ids = []
    for station in ("cell-1", "cell-2"):
        source = create_source(
            FolderSourceConfig(kind="folder", path=hot, settle_seconds=0, poll_interval=0.02), station=station
        )
        runner = Runner(source)
        try:
            (frame,) = runner.take(1)
            ids.append(frame.result_id)
            source.release(frame)
        finally:
            runner.close()

    # then
    assert ids[0] != ids[1]


KILLED_AFTER_ACK = """
import os, signal, sys, threading
from pathlib import Path
from lineside.agent.sources import FolderSourceConfig, create_source
from lineside.agent.sources import folder

hot = Path(sys.argv[1])
append = folder.Ledger.append

def append_then_die(self, entry):
    append(self, entry)
    os.kill(os.getpid(), signal.SIGKILL)  # power cut right after the acknowledgement was recorded

folder.Ledger.append = append_then_die
source = create_source(FolderSourceConfig(kind="folder", path=hot, settle_seconds=0, poll_interval=0.02))
source.start(threading.Event())
frame = next(source.frames())
print(frame.result_id, flush=True)
source.ack(frame, ok=frame.error is None, reason=frame.error)
"""


@pytest.mark.parametrize("good", [True, False], ids=["inspected", "failed"])
def test_an_ack_recorded_just_before_a_kill_is_finished_by_the_next_process(
    hot: Path, put_png: Callable[..., Path], good: bool
) -> None:
    # given a process killed (SIGKILL) right after recording its acknowledgement, before any move
    if good:
        put_png(hot / "part.png")
    else:
        (hot / "part.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    child = subprocess.run(
        [sys.executable, "-c", KILLED_AFTER_ACK, str(hot)], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    result_id = child.stdout.strip()
    assert (hot / "part.png").exists()

    # when a fresh process opens the same folders
    restarted = make_source(hot)
    runner = Runner(restarted)
    try:
        quiet = runner.nothing_within(0.3)
    finally:
        runner.close()

    # then the ledger entry survived the kill: the file is finished where it belongs, not inspected again
    assert quiet
    assert restarted.snapshot()["recovered"] == 1
    assert not (hot / "part.png").exists()
    if good:
        assert (restarted.done_dir / "part.png").exists()
        assert not restarted.failed_dir.exists() or not any(restarted.failed_dir.iterdir())
    else:
        # a failed file keeps its place in failed/ and its error record
        assert (restarted.failed_dir / "part.png").exists()
        report = json.loads((restarted.failed_dir / "part.png.error.json").read_text())
        assert report["code"] == "decode_failed" and report["result_id"] == result_id
        assert not any(restarted.done_dir.iterdir())


def test_the_ledger_entry_is_fsynced_before_the_file_moves(
    hot: Path, put_png: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a recorder of fsyncs and moves, in the order they happen (a kill test cannot see a missing
    # fsync: only a power cut loses what the kernel already holds)
    from lineside.agent.sources import folder

    order: list[str] = []
    real_fsync, real_move = os.fsync, folder.shutil.move

    def fsync(fd: int) -> None:
        order.append(f"fsync:{os.readlink(f'/proc/self/fd/{fd}')}")
        real_fsync(fd)

    def move(src: object, dst: object) -> object:
        order.append("move")
        return real_move(src, dst)

    monkeypatch.setattr(folder.os, "fsync", fsync)
    monkeypatch.setattr(folder.shutil, "move", move)
    put_png(hot / "a.png")
    source = make_source(hot)
    runner = Runner(source)
    try:
        (frame,) = runner.take(1)
        order.clear()

        # when
        source.ack(frame, ok=True)
    finally:
        runner.close()

    # then the ledger file was synced before the move
    ledger = str((source.state_dir / LEDGER_NAME).resolve())
    assert f"fsync:{ledger}" in order
    assert order.index(f"fsync:{ledger}") < order.index("move")


# -- what mutation testing showed untested ---------------------------------------------------------


def test_documented_defaults_and_bounds_of_the_folder_config(hot: Path) -> None:
    # given the minimal section (the README and the sample config quote these defaults)
    config = FolderSourceConfig(kind="folder", path=hot)

    # then
    assert (config.settle_seconds, config.poll_interval, config.retry_seconds) == (2.0, 0.5, 10.0)
    assert config.patterns == ["*.png", "*.tif", "*.tiff", "*.jpg", "*.jpeg"]
    assert (config.done_dir, config.failed_dir, config.state_dir) == (hot / "done", hot / "failed", hot / ".lineside")
    assert config.sidecar and not config.sidecar_required
    assert FolderSourceConfig(kind="folder", path=hot, settle_seconds=0, retry_seconds=0).settle_seconds == 0
    for bad in ({"settle_seconds": -1}, {"retry_seconds": -0.5}, {"poll_interval": 0}, {"patterns": []}):
        with pytest.raises(ValidationError):
            FolderSourceConfig(kind="folder", path=hot, **bad)


@pytest.mark.parametrize(
    ("regex", "problem"),
    [
        ("(unclosed", "not a valid regular expression"),
        (r"^\w+", "expected named groups"),
        (r"(?P<serial>\w+)", "serial"),
    ],
)
def test_a_part_id_regex_must_compile_and_name_only_part_and_view(hot: Path, regex: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        FolderSourceConfig(kind="folder", path=hot, part_id_regex=regex)


def test_a_regex_with_only_a_part_group_gives_no_view(hot: Path, put_png: Callable[..., Path]) -> None:
    put_png(hot / "CAST7.png")
    runner = Runner(make_source(hot, part_id_regex=r"^(?P<part>[A-Z]+\d+)"))
    try:
        (frame,) = runner.take(1)
        assert (frame.part_id, frame.view, frame.error) == ("CAST7", None, None)
    finally:
        runner.close()


def test_sidecar_values_are_normalised_to_text_part_ids_and_integer_views(
    hot: Path, put_png: Callable[..., Path]
) -> None:
    # given a sidecar written by a PLC gateway with a numeric serial and a textual view
    put_png(hot / "x.png")
    (hot / "x.png.json").write_text(json.dumps({"part_id": 123456, "view": "4"}))
    runner = Runner(make_source(hot))
    try:
        (frame,) = runner.take(1)
        assert (frame.part_id, frame.view) == ("123456", 4)
    finally:
        runner.close()


def test_a_sidecar_that_is_not_an_object_is_an_error_frame(hot: Path, put_png: Callable[..., Path]) -> None:
    put_png(hot / "x.png")
    (hot / "x.json").write_text("[1, 2]")
    runner = Runner(make_source(hot))
    try:
        (frame,) = runner.take(1)
        assert frame.error is not None and frame.error.code == "bad_sidecar" and "JSON object" in frame.error.message
    finally:
        runner.close()


def test_with_sidecars_required_only_images_that_have_one_are_taken(hot: Path, put_png: Callable[..., Path]) -> None:
    # given two images, the first (by name and age) without its sidecar yet
    now = time.time()
    for age, name in enumerate(["a.png", "b.png"]):
        os.utime(put_png(hot / name), (now - 10 + age, now - 10 + age))
    (hot / "b.json").write_text(json.dumps({"part_id": "P2"}))
    runner = Runner(make_source(hot, sidecar_required=True))
    try:
        # when / then: b is taken, a waits for its sidecar
        (frame,) = runner.take(1)
        assert frame.frame_id == "b.png" and runner.nothing_within(0.2)
        (hot / "a.json").write_text(json.dumps({"part_id": "P1"}))
        (later,) = runner.take(1)
        assert (later.frame_id, later.part_id) == ("a.png", "P1")
    finally:
        runner.close()


def test_oldest_first_goes_by_modification_time_not_by_size(hot: Path, put_png: Callable[..., Path]) -> None:
    # given the oldest file also the largest
    now = time.time()
    for age, (name, side) in enumerate([("z.png", 96), ("y.png", 48), ("x.png", 16)]):
        os.utime(put_png(hot / name, height=side, width=side), (now - 100 + age, now - 100 + age))
    runner = Runner(make_source(hot))
    try:
        assert [f.frame_id for f in runner.take(3)] == ["z.png", "y.png", "x.png"]
    finally:
        runner.close()


def test_a_file_rewritten_smaller_while_settling_waits_again(hot: Path, make_png: Callable[..., bytes]) -> None:
    # given a file that is replaced by a shorter one before it settled
    runner = Runner(make_source(hot, settle_seconds=0.6))
    try:
        (hot / "part.png").write_bytes(make_png(96, 96, value=3) + bytes(5000))
        assert runner.nothing_within(0.4)
        (hot / "part.png").write_bytes(make_png(32, 32, value=9))

        # then the settle time starts over from the rewrite
        assert runner.nothing_within(0.35)
        (frame,) = runner.take(1)
        assert frame.image is not None and frame.image.shape == (32, 32)
    finally:
        runner.close()


def test_a_released_frame_waits_its_retry_time(hot: Path, put_png: Callable[..., Path]) -> None:
    put_png(hot / "a.png")
    source = make_source(hot, retry_seconds=60)
    runner = Runner(source)
    try:
        (frame,) = runner.take(1)
        source.release(frame)
        assert runner.nothing_within(0.3)
    finally:
        runner.close()


def test_a_failure_without_a_reason_is_recorded_as_failed(hot: Path, put_png: Callable[..., Path]) -> None:
    put_png(hot / "a.png")
    source = make_source(hot)
    runner = Runner(source)
    try:
        (frame,) = runner.take(1)
        source.ack(frame, ok=False)
        report = json.loads((source.failed_dir / "a.png.error.json").read_text())
        assert (report["code"], report["message"]) == ("failed", "no reason given")
        entry = json.loads((source.state_dir / LEDGER_NAME).read_text().splitlines()[-1])
        assert (entry["ok"], entry["code"]) == (False, "failed")
    finally:
        runner.close()


def test_an_ok_ack_records_no_reason_even_if_one_is_given(hot: Path, put_png: Callable[..., Path]) -> None:
    put_png(hot / "a.png")
    source = make_source(hot)
    runner = Runner(source)
    try:
        (frame,) = runner.take(1)
        source.ack(frame, ok=True, reason=FrameError("x", "stale reason"))
        entry = json.loads((source.state_dir / LEDGER_NAME).read_text().splitlines()[-1])
        assert (entry["ok"], entry["code"], entry["message"]) == (True, None, None)
    finally:
        runner.close()


def test_the_same_failing_bytes_twice_keep_two_places_in_failed(hot: Path) -> None:
    # given one undecodable file, failed once
    source = make_source(hot)
    runner = Runner(source)
    try:
        (hot / "bad.png.tmp").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        (hot / "bad.png.tmp").rename(hot / "bad.png")
        (frame,) = runner.take(1)
        source.ack(frame, ok=False, reason=frame.error)

        # when the very same bytes arrive again under the same name (same key: the same file, so it is
        # not inspected again), written as the hot-folder contract says: complete, then renamed
        (hot / "bad.png.tmp").write_bytes(b"\x89PNG\r\n\x1a\n broken")
        (hot / "bad.png.tmp").rename(hot / "bad.png")
        deadline = time.monotonic() + 10
        while (hot / "bad.png").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

        # then it was moved beside the first, under a name derived from its key, with its own report
        assert runner.nothing_within(0.1) and source.snapshot()["recovered"] == 1
        names = {p.name for p in source.failed_dir.iterdir()}
        renamed = [n for n in names if re.fullmatch(r"bad\.[0-9a-f]{12}\.png", n)]
        assert len(renamed) == 1
        assert names == {"bad.png", "bad.png.error.json", renamed[0], renamed[0] + ".error.json"}
        assert json.loads((source.failed_dir / f"{renamed[0]}.error.json").read_text())["code"] == "decode_failed"
    finally:
        runner.close()


@pytest.mark.parametrize("sidecar", ["P1.json", "P1.png.json"])
def test_a_renamed_file_takes_its_sidecar_along_under_the_matching_name(
    hot: Path, put_png: Callable[..., Path], sidecar: str
) -> None:
    # given done/ already holds a P1.png, and a new P1.png arrives with a sidecar
    source = make_source(hot)
    runner = Runner(source)
    try:
        put_png(hot / "P1.png", value=1)
        (first,) = runner.take(1)
        source.ack(first, ok=True)
        put_png(hot / "P1.png", value=2)
        (hot / sidecar).write_text(json.dumps({"part_id": "S2"}))
        (second,) = runner.take(1)
        source.ack(second, ok=True)

        # then the sidecar follows the new name in the sidecar's own style
        renamed = next(p for p in source.done_dir.glob("P1.*.png"))
        expected = f"{renamed.name}.json" if sidecar == "P1.png.json" else f"{renamed.stem}.json"
        assert (source.done_dir / expected).is_file()
    finally:
        runner.close()


def test_a_compacted_ledger_keeps_the_newest_entries(hot: Path) -> None:
    # given a ledger of five entries, one unreadable line of each kind, and a limit of three
    state = hot / ".lineside"
    state.mkdir()
    lines = [json.dumps({"key": f"k{i}", "result_id": f"r{i}", "ok": True}) for i in range(5)]
    lines[1:1] = ["{not json", json.dumps({"result_id": "no key"}), json.dumps(["a", "list"])]
    (state / LEDGER_NAME).write_text("\n".join(lines) + "\n")

    # when it is opened
    ledger = Ledger(state / LEDGER_NAME, keep=3)
    ledger.close()

    # then the three newest survive, in the file too
    assert list(ledger.entries) == ["k2", "k3", "k4"]
    assert [json.loads(line)["key"] for line in (state / LEDGER_NAME).read_text().splitlines()] == ["k2", "k3", "k4"]


def test_a_ledger_within_its_limit_is_not_rewritten(hot: Path) -> None:
    state = hot / ".lineside"
    state.mkdir()
    text = json.dumps({"key": "k", "result_id": "r", "ok": False, "code": "x", "message": "y"}) + "\n"
    (state / LEDGER_NAME).write_text(text)
    ledger = Ledger(state / LEDGER_NAME, keep=3)
    ledger.close()
    assert (state / LEDGER_NAME).read_text() == text
    assert ledger.get("k") == LedgerEntry("k", "r", False, "x", "y")


def test_folders_are_made_with_their_parents_and_a_blocked_one_is_a_source_error(hot: Path, tmp_path: Path) -> None:
    # given done/ two levels below a missing folder, and failed/ below a file
    deep = tmp_path / "out" / "line-3" / "done"
    make_source(hot, done_dir=deep).start(threading.Event())
    assert deep.is_dir()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    source = make_source(hot, failed_dir=blocker / "failed")

    # when / then
    with pytest.raises(SourceError, match="cannot prepare folders"):
        source.start(threading.Event())


def test_close_before_start_is_safe(hot: Path) -> None:
    source = make_source(hot)
    source.close()
    source.close()


def test_a_hot_folder_that_vanishes_is_polled_until_it_comes_back(
    hot: Path, put_png: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    # given a running source whose hot folder disappears (a network share unmounted)
    out = hot.parent
    source = make_source(hot, state_dir=out / "state", done_dir=out / "done", failed_dir=out / "failed")
    runner = Runner(source)
    caplog.set_level(logging.INFO, logger="lineside.agent.sources.folder")
    try:
        assert source.problem() is None
        hot.rmdir()
        deadline = time.monotonic() + 5
        while source.snapshot().get("scan_errors", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        # then it is reported as missing (readiness reads this), logged once for the whole outage
        assert source.problem() == f"hot folder {hot} is missing"

        # when it comes back with a file
        hot.mkdir()
        put_png(hot / "back.png")

        # then the source survived, counted the failed scans, delivers, and says it is back
        (frame,) = runner.take(1)
        assert frame.frame_id == "back.png"
        assert source.snapshot()["scan_errors"] >= 3 and source.problem() is None
        messages = [r.getMessage() for r in caplog.records]
        assert sum("cannot scan hot folder" in m for m in messages) == 1
        assert sum(m == f"hot folder {hot} is back" for m in messages) == 1
    finally:
        runner.close()


def test_a_ledger_at_its_limit_is_left_as_it_is(hot: Path) -> None:
    # given exactly as many entries as the limit
    state = hot / ".lineside"
    state.mkdir()
    text = "".join(json.dumps({"key": f"k{i}", "result_id": f"r{i}", "ok": True}) + "\n" for i in range(3))
    (state / LEDGER_NAME).write_text(text)

    # when / then: nothing to compact, the file is not rewritten
    Ledger(state / LEDGER_NAME, keep=3).close()
    assert (state / LEDGER_NAME).read_text() == text


def test_a_partial_last_ledger_line_is_dropped_and_said(hot: Path, caplog: pytest.LogCaptureFixture) -> None:
    # given a complete entry and the first 9 bytes of the next, cut by a crash
    state = hot / ".lineside"
    state.mkdir()
    whole = json.dumps({"key": "k", "result_id": "r", "ok": True}) + "\n"
    (state / LEDGER_NAME).write_text(whole + '{"key": "')

    # when
    Ledger(state / LEDGER_NAME).close()

    # then the cut entry is gone from the file, and the log says how much was dropped
    lines = (state / LEDGER_NAME).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["key"] == "k"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{state / LEDGER_NAME}: dropping a partial last line (9 bytes)"]


def test_a_complete_ledger_opens_without_a_warning(hot: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = hot / ".lineside"
    state.mkdir()
    (state / LEDGER_NAME).write_text(json.dumps({"key": "k", "result_id": "r", "ok": True}) + "\n")
    Ledger(state / LEDGER_NAME).close()
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_one_pattern_is_enough(hot: Path) -> None:
    assert FolderSourceConfig(kind="folder", path=hot, patterns=["*.tif"]).patterns == ["*.tif"]
