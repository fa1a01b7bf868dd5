"""The agent never imports MXNet, GluonCV or the export stage, and runs on current numpy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import sys, pkgutil, importlib
import lineside.agent
for m in pkgutil.walk_packages(lineside.agent.__path__, "lineside.agent."):
    if not m.name.endswith("__main__"):
        importlib.import_module(m.name)
from lineside.agent.cli import main
try:
    main(["--help"])
except SystemExit:
    pass
bad = sorted(
    m for m in sys.modules
    if m.split(".")[0] in ("mxnet", "gluoncv", "onnx", "agent", "export") or m.startswith("lineside.export")
)
import numpy
print("numpy", numpy.__version__)
print("forbidden", bad)
sys.exit(1 if bad else 0)
"""


def _pythons() -> list[str]:
    found = [sys.executable]
    agent_python = os.environ.get("LINESIDE_AGENT_PYTHON")
    if agent_python:
        found.append(agent_python)
    return found


@pytest.mark.parametrize("python", _pythons())
def test_importing_every_agent_module_pulls_in_no_mxnet_or_export(python: str) -> None:
    proc = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "forbidden []" in proc.stdout


def test_agent_only_environment_has_no_mxnet_and_current_numpy() -> None:
    agent_python = os.environ.get("LINESIDE_AGENT_PYTHON")
    if not agent_python:
        pytest.skip("LINESIDE_AGENT_PYTHON not set: run through `make test`, which builds .venv-agent")
    # given the venv made by `pip install -e .[agent,dev]` alone
    proc = subprocess.run(
        [
            agent_python,
            "-c",
            "import importlib.util, numpy; print(importlib.util.find_spec('mxnet') is None, numpy.__version__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # then MXNet is absent and numpy is not held back to MXNet's 1.23
    no_mxnet, version = proc.stdout.split()
    assert no_mxnet == "True"
    assert int(version.split(".")[0]) >= 2
