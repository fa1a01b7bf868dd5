"""systemd-analyze on a unit inside a root folder (offline: no running systemd needed), as fixtures."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
SKIP_REASON = "systemd-analyze is missing: apt-get install -y systemd (make systemd-analyze does it)"
HOST_UNITS = (
    Path("/usr/lib/systemd/system") if Path("/usr/lib/systemd/system").is_dir() else Path("/lib/systemd/system")
)


def prepare_root(root: Path) -> None:
    """Give `root` the host's targets (verify resolves sysinit.target, multi-user.target, ... there)."""
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for target in HOST_UNITS.glob("*.target"):
        if not (units / target.name).exists():
            shutil.copy(target, units / target.name)


def analyze(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze ARGS --root=ROOT`; the caller skips when SYSTEMD_ANALYZE is None."""
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args, f"--root={root}"], capture_output=True, text=True, timeout=120, check=False
    )


def exposure(output: str) -> float:
    """The overall exposure figure of `systemd-analyze security` output."""
    line = next(line for line in output.splitlines() if "Overall exposure level" in line)
    return float(line.split(":", 1)[1].split()[0])


@pytest.fixture
def unit_check() -> SimpleNamespace:
    """prepare_root(root), analyze(root, *args), exposure(text); skips when systemd-analyze is missing."""
    if SYSTEMD_ANALYZE is None:
        pytest.skip(SKIP_REASON)
    return SimpleNamespace(prepare_root=prepare_root, analyze=analyze, exposure=exposure)
