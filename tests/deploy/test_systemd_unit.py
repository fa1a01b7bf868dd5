"""The unit file: `systemd-analyze verify` accepts it and `security --offline=true` rates it 2.0 or lower."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "lineside-agent.service"


@pytest.fixture
def root(tmp_path: Path, unit_check: SimpleNamespace) -> Path:
    """A root holding the unit and a stand-in for the executable it names (verify checks it exists)."""
    root = tmp_path / "root"
    unit_check.prepare_root(root)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    agent = root / "opt/lineside/venv/bin/lineside-agent"
    agent.parent.mkdir(parents=True)
    agent.write_text("#!/bin/sh\n")
    agent.chmod(0o755)
    return root


def test_systemd_analyze_verify_accepts_the_unit(root: Path, unit_check: SimpleNamespace) -> None:
    # when
    proc = unit_check.analyze(root, "verify", UNIT.name)

    # then no error and no warning (an unknown key is only a warning, so stderr must be clean too)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""


def test_verify_notices_a_missing_executable(root: Path, unit_check: SimpleNamespace) -> None:
    # given the venv not installed
    (root / "opt/lineside/venv/bin/lineside-agent").unlink()

    # when
    proc = unit_check.analyze(root, "verify", UNIT.name)

    # then (proves the check above looks at the unit for real)
    assert proc.returncode != 0 and "lineside-agent is not executable" in proc.stderr


def test_security_exposure_is_2_or_lower(root: Path, unit_check: SimpleNamespace) -> None:
    # when
    proc = unit_check.analyze(root, "security", "--offline=true", UNIT.name)

    # then
    assert proc.returncode == 0, proc.stderr
    assert unit_check.exposure(proc.stdout) <= 2.0, proc.stdout


def test_the_unit_states_what_the_agent_relies_on() -> None:
    # given
    lines = {line.strip() for line in UNIT.read_text().splitlines()}

    # then: notify + watchdog (fed by the agent), no restart loop on a config error, a stop budget above
    # the agent's stop_timeout_s (20 s), and the hot folder writable
    for expected in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "RestartPreventExitStatus=78",
        "Restart=on-failure",
        "TimeoutStopSec=30",
        "ReadWritePaths=-/srv/xray",
        "DevicePolicy=closed",
        "CapabilityBoundingSet=",
        "User=lineside",
    ):
        assert expected in lines, expected
