"""Stopping: a second signal exits at once without corrupting the ledger or the results; journald logging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

DAEMON = """
import sys, time
import numpy as np
from lineside.agent.cli import configure_logging
from lineside.agent.config import parse_config
from lineside.agent.inference.types import Prediction
from lineside.agent.runtime import Agent

class Manifest:
    bundle_id, version = "b", "2026.01.01-1"

class Engine:
    providers_in_use = ["CPUExecutionProvider"]
    manifest = Manifest()
    def __init__(self, delay):
        self.delay = delay
    def predict(self, image, bits_stored=None):
        time.sleep(self.delay)
        return Prediction(is_defective=False, score=0.1, boxes=(), model_scores={}, fired=(), timings_ms={})
    def close(self):
        pass

tmp, delay = sys.argv[1], float(sys.argv[2])
configure_logging("INFO")
config = parse_config({
    "station": "s", "bundle": {"path": tmp},
    "source": {"kind": "folder", "path": tmp + "/hot", "done_dir": tmp + "/done", "failed_dir": tmp + "/failed",
               "state_dir": tmp + "/state", "settle_seconds": 0, "poll_interval": 0.05},
    "sinks": [{"kind": "jsonl", "path": tmp + "/results.jsonl", "fsync": True}],
    "status_log": {"interval_s": 0}, "health": {"enabled": False}, "notify": {"enabled": False},
})
sys.exit(Agent(config, engine_loader=lambda c: Engine(delay)).run())
"""


def start(tmp_path: Path, delay: float, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID", "NOTIFY_SOCKET")}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", DAEMON, str(tmp_path), str(delay)], stdout=out, stderr=subprocess.STDOUT, env=env
        )


def wait_until(check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)


def results(tmp_path: Path) -> list[dict]:
    path = tmp_path / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_second_sigterm_exits_at_once_and_a_restart_loses_and_repeats_nothing(
    tmp_path: Path, put_png: Callable[..., Path]
) -> None:
    # given a daemon inspecting 12 files slowly (half a second each)
    hot = tmp_path / "hot"
    hot.mkdir()
    names = [f"P{i:02d}.png" for i in range(12)]
    for i, name in enumerate(names):
        put_png(hot / name, value=10 + i)
    log = tmp_path / "agent.log"
    proc = start(tmp_path, 0.5, log)
    wait_until(lambda: len(results(tmp_path)) >= 2, proc, log)

    # when it is told to stop, and told again while it finishes the frame in the engine
    proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "received SIGTERM; stopping" in log.read_text(), proc, log)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(30)
    text = log.read_text()

    # then it left at once with 128+15, saying so
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert "received SIGTERM again while stopping; exiting at once (exit 143)" in text
    assert "stopped; counters" not in text  # it did not wait for the orderly stop

    # when restarted with a fast engine until the hot folder is empty, then stopped once
    proc = start(tmp_path, 0.0, log)
    wait_until(lambda: not list(hot.glob("*.png")), proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()[-3000:]

    # then every file has exactly one result and one ledger entry, and sits in done/
    got = results(tmp_path)
    assert Counter(r["meta"]["file"] for r in got) == dict.fromkeys(names, 1)
    ledger = [json.loads(line) for line in (tmp_path / "state" / "ledger.jsonl").read_text().splitlines()]
    assert sorted(e["key"].split(":")[0] for e in ledger) == names
    assert sorted(p.name for p in (tmp_path / "done").iterdir()) == names


LOGGING = """
import logging, sys
from lineside.agent.cli import configure_logging
configure_logging("DEBUG")
log = logging.getLogger("lineside.agent.test")
log.debug("d"); log.info("frame %s of bundle %s", "f-1", "2026.01.01-1"); log.warning("w"); log.error("e")
try:
    raise RuntimeError("boom")
except RuntimeError:
    log.exception("failed")
"""


def run_logging(tmp_path: Path, journal: bool) -> list[str]:
    err = tmp_path / ("journal.txt" if journal else "plain.txt")
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    with err.open("wb") as fh:
        if journal:  # what systemd sets: the device and inode of the stream it connected to stderr
            st = os.fstat(fh.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", LOGGING], stderr=fh, env=env, check=True, timeout=60)
    return err.read_text().splitlines()


def test_journal_stream_gets_priority_prefixes_on_every_line(tmp_path: Path) -> None:
    # when
    lines = run_logging(tmp_path, journal=True)

    # then each level maps to its syslog priority, traceback lines included; no timestamps, no level names
    assert lines[:4] == [
        "<7>lineside.agent.test: d",
        "<6>lineside.agent.test: frame f-1 of bundle 2026.01.01-1",
        "<4>lineside.agent.test: w",
        "<3>lineside.agent.test: e",
    ]
    assert lines[4] == "<3>lineside.agent.test: failed"
    assert len(lines) > 5 and all(line.startswith("<3>") for line in lines[4:])
    assert lines[-1] == "<3>RuntimeError: boom"


def test_outside_systemd_lines_have_timestamps_and_level_names(tmp_path: Path) -> None:
    # when
    lines = run_logging(tmp_path, journal=False)

    # then
    assert lines[2].endswith("WARNING lineside.agent.test: w") and lines[2][:4].isdigit()
    assert not any(line.startswith("<") for line in lines)


@pytest.mark.parametrize("value", ["", "garbage", "1:2"])
def test_a_journal_stream_that_is_not_our_stderr_gets_no_prefixes(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lineside.agent.cli import stderr_is_journal

    # given JOURNAL_STREAM inherited from elsewhere (stderr redirected to a file by a script)
    monkeypatch.setenv("JOURNAL_STREAM", value)

    # then
    assert stderr_is_journal() is False


SLOW_LOAD = """
import sys, time
from lineside.agent.cli import configure_logging
from lineside.agent.config import parse_config
from lineside.agent.runtime import Agent

def load(config):
    print("loading", flush=True)
    time.sleep(300)  # a long TensorRT build
    raise AssertionError("not reached")

configure_logging("INFO")
config = parse_config({"station": "s", "bundle": {"path": sys.argv[1]},
                       "source": {"kind": "replay", "path": sys.argv[1]}, "sinks": []})
sys.exit(Agent(config, engine_loader=load, services=[]).run())
"""


def test_a_second_sigint_while_the_bundle_loads_exits_at_once(tmp_path: Path) -> None:
    # given a daemon stuck loading its bundle, already asked once to stop
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_LOAD, str(tmp_path)], stdout=out, stderr=subprocess.STDOUT)
    wait_until(lambda: "loading" in log.read_text(), proc, log)
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: "received SIGINT; stopping (a second signal exits at once)" in log.read_text(), proc, log)

    # when Ctrl-C is pressed again
    proc.send_signal(signal.SIGINT)

    # then it leaves at once with 130 (it would otherwise sit out the 300 s load), saying why
    assert proc.wait(60) == 128 + signal.SIGINT
    assert "received SIGINT again while stopping; exiting at once (exit 130)" in log.read_text()
