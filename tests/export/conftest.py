"""Shared fixtures for the export tests: synthetic data sets and the real GDXray folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lineside.export.synth import SynthSummary, generate

REPO = Path(__file__).resolve().parents[2]
SMALL = (192, 256)  # (height, width): small enough to keep the suite fast, large enough for 40 px defects


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SynthSummary]:
    """24 small synthetic images in 4 series of 6, a third of them defect-free."""
    root = tmp_path_factory.mktemp("synth")
    summary = generate(root, 24, seed=11, size=SMALL, images_per_series=6, defect_free_share=1 / 3)
    return root, summary


@pytest.fixture(scope="session")
def gdxray_root() -> Path:
    """The real GDXray Castings subset: $LINESIDE_GDXRAY, else <repo>/../shared/data/gdxray."""
    root = Path(os.environ.get("LINESIDE_GDXRAY") or REPO.parent / "shared" / "data" / "gdxray")
    if not (root / "Castings").is_dir():
        pytest.skip(f"GDXray data not found at {root} (set LINESIDE_GDXRAY to its folder)")
    return root
