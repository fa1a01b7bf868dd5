"""deploy/install.sh and uninstall.sh run into a temporary root (DESTDIR): the tree, idempotency, the unit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.integration  # four real installs (venv + package build) into temporary roots

REPO = Path(__file__).resolve().parents[2]
UNIT = "lineside-agent.service"


def run(script: str, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # --no-deps: the tree is what is tested, not ONNX Runtime's download; the package itself is built.
    env = {**os.environ, "DESTDIR": str(root), "LINESIDE_PIP_ARGS": "--no-deps"}
    return subprocess.run(
        ["bash", str(REPO / "deploy" / script), *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[subprocess.CompletedProcess[str]]]:
    """A root the install ran into twice, the plant having edited its config in between."""
    root = tmp_path_factory.mktemp("box") / "root"
    first = run("install.sh", root)
    assert first.returncode == 0, first.stderr[-3000:]
    (root / "etc/lineside/agent.yaml").write_text("station: edited-by-the-plant\n")
    second = run("install.sh", root)
    assert second.returncode == 0, second.stderr[-3000:]
    return root, [first, second]


def test_install_produces_the_expected_tree(installed: tuple[Path, list]) -> None:
    root, _ = installed

    # then: venv with the agent's entry point, run from its final place; config, credentials, state, unit
    agent = root / "opt/lineside/venv/bin/lineside-agent"
    assert agent.is_file() and os.access(agent, os.X_OK)
    assert agent.read_text().splitlines()[0] == "#!/opt/lineside/venv/bin/python"
    assert (root / "opt/lineside/README.md").is_file()
    assert (root / "etc/lineside/credentials").stat().st_mode & 0o777 == 0o700
    assert (root / "var/lib/lineside/bundles").is_dir()
    assert (root / "etc/systemd/system" / UNIT).read_text() == (REPO / "systemd" / UNIT).read_text()
    # the agent extra only: no MXNet, no export stage entry point in use
    site = next((root / "opt/lineside/venv/lib").glob("python3*/site-packages"))
    assert not list(site.glob("mxnet*"))


def test_install_again_keeps_the_plants_config(installed: tuple[Path, list]) -> None:
    root, (first, second) = installed

    # then the second run upgraded in place and left the edited file alone
    assert "wrote /etc/lineside/agent.yaml from the sample" in first.stdout
    assert "kept the existing /etc/lineside/agent.yaml" in second.stdout
    assert "created /opt/lineside/venv" not in second.stdout
    assert (root / "etc/lineside/agent.yaml").read_text() == "station: edited-by-the-plant\n"


def test_the_installed_unit_verifies(installed: tuple[Path, list], unit_check: SimpleNamespace) -> None:
    root, _ = installed
    unit_check.prepare_root(root)

    # when
    proc = unit_check.analyze(root, "verify", UNIT)

    # then the unit and the executable it names fit together
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""


def test_prefix_moves_the_venv_and_the_unit_follows(tmp_path: Path, unit_check: SimpleNamespace) -> None:
    # when
    root = tmp_path / "root"
    proc = run("install.sh", root, "--prefix", "/srv/lineside-agent")

    # then
    assert proc.returncode == 0, proc.stderr[-3000:]
    unit = (root / "etc/systemd/system" / UNIT).read_text()
    assert "ExecStart=/srv/lineside-agent/venv/bin/lineside-agent run" in unit and "/opt/lineside" not in unit
    unit_check.prepare_root(root)
    verify = unit_check.analyze(root, "verify", UNIT)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr


def test_uninstall_keeps_data_unless_purged(tmp_path: Path) -> None:
    # given an installed root with results in its state folder
    root = tmp_path / "root"
    assert run("install.sh", root).returncode == 0
    (root / "var/lib/lineside/results.jsonl").write_text("{}\n")

    # when uninstalled twice (idempotent), then purged
    once, twice = run("uninstall.sh", root), run("uninstall.sh", root)
    kept = (root / "var/lib/lineside/results.jsonl").exists() and (root / "etc/lineside/agent.yaml").exists()
    purged = run("uninstall.sh", root, "--purge")

    # then
    assert once.returncode == twice.returncode == purged.returncode == 0, once.stderr + twice.stderr
    assert kept
    assert not (root / "opt/lineside").exists() and not (root / "etc/systemd/system" / UNIT).exists()
    assert not (root / "var/lib/lineside").exists() and not (root / "etc/lineside").exists()


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    # when
    relative = run("install.sh", tmp_path / "root", "--prefix", "opt/lineside")
    unknown = run("uninstall.sh", tmp_path / "root", "--force")

    # then
    assert relative.returncode == 2 and "must be an absolute path" in relative.stderr
    assert unknown.returncode == 2 and "unknown argument: --force" in unknown.stderr
