"""What the integration tests share: the agent daemon as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

REPO = Path(__file__).resolve().parents[2]
STARTUP_S = 90.0  # bundle verification, session creation, warm-up and golden check on a busy CPU


def daemon_env(**extra: str) -> dict[str, str]:
    """The test's environment, unbuffered, without anything that would make the agent think it runs
    under systemd or reach a real AWS account."""
    env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "JOURNAL_STREAM", "AWS_PROFILE")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Daemon:
    """A `python -m lineside.agent.cli run` process with its stderr in a file (a pipe could fill up and block it)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        self._log_file: IO[bytes] = log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lineside.agent.cli", "run", "--config", str(config)],
            cwd=REPO,
            env=daemon_env(),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = STARTUP_S) -> None:
        """Poll `condition` until true; fail early if the daemon died, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"agent exited with {self.proc.returncode} while waiting for {what}:\n{self.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.tail()}")
            time.sleep(0.05)

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log_file.close()

    def counters(self) -> dict[str, Any]:
        """The counters the daemon logs when it stops."""
        lines = [line for line in self.tail(100_000).splitlines() if "stopped; counters: " in line]
        assert lines, f"no counters logged:\n{self.tail()}"
        return json.loads(lines[-1].split("stopped; counters: ", 1)[1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log_file.close()


@pytest.fixture
def daemons() -> Iterator[Callable[[Path, Path], Daemon]]:
    """Starts `lineside-agent run --config CONFIG` processes logging to LOG; any still running when the
    test ends (e.g. after a failed assertion) is killed."""
    started: list[Daemon] = []

    def start(config: Path, log: Path) -> Daemon:
        started.append(Daemon(config, log))
        return started[-1]

    yield start
    for daemon in started:
        daemon.kill()
