"""The install puts the code under one namespace, `lineside.agent` and `lineside.export`."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed_under_the_lineside_namespace() -> None:
    # given the packaging table and the package folders on disk
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = setuptools["package-dir"]
    on_disk = {
        f"lineside.{init.parent.relative_to(REPO).as_posix().replace('/', '.')}"
        for top in ("agent", "export")
        for init in (REPO / top).rglob("__init__.py")
    }
    # then every folder is listed (a missing one would be left out of a wheel), and nothing else
    assert mapping == {"lineside.agent": "agent", "lineside.export": "export"}
    assert set(setuptools["packages"]) == on_disk


def test_installed_package_has_no_generic_top_level_names() -> None:
    import lineside.agent

    # when imported by its installed name, it resolves to this checkout's agent/ folder
    assert Path(lineside.agent.__file__).resolve().parent == REPO / "agent"
