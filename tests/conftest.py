"""Session fixtures shared by every suite: synthetic X-rays and a real bundle from our export stage.

In the full environment (.venv, MXNet present) the bundle is trained and built here, for real, from
synthetic data. In the agent-only environment (.venv-agent, no MXNet) the suite reuses the bundle the
first run left at $LINESIDE_TEST_BUNDLE: the agent never needs MXNet, not even in its tests.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HAS_MXNET = importlib.util.find_spec("mxnet") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import subprocess

    try:
        has_gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        has_gpu = False
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi found none)"))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 small synthetic radiographs (286x384) in the GDXray layout, 8-bit."""
    from lineside.export.synth import generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, images=48, seed=3, size=(286, 384), images_per_series=8)
    return out


@pytest.fixture(scope="session")
def trained_runs(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model trained for a few real MXNet iterations on the synthetic set."""
    if not HAS_MXNET:
        pytest.skip("MXNet is not installed in this environment (agent-only venv)")
    from lineside.export.cli import _datasets
    from lineside.export.train import TrainOptions, train_classifier, train_ssd, train_vae

    _, train, val, _test, split = _datasets(str(synth_dir), None)
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for kind, fn in (("classifier", train_classifier), ("vae", train_vae), ("ssd", train_ssd)):
        opts = TrainOptions(out=root / kind, epochs=2, iters_per_epoch=3, batch_size=4, val_batches=2, seed=1)
        runs[kind] = fn(train, val, opts, split)
    return runs


@pytest.fixture(scope="session")
def test_bundle(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A verified bundle folder built by `export.build` (or the one a full run left behind)."""
    given = os.environ.get("LINESIDE_TEST_BUNDLE")
    if not HAS_MXNET:
        if not given or not (Path(given) / "manifest.json").is_file():
            pytest.fail(
                "agent-only run needs LINESIDE_TEST_BUNDLE pointing to a bundle built by the full run "
                "(make test does this)"
            )
        return Path(given)
    from lineside.export.build import BuildOptions, build_bundle, dataset_summary
    from lineside.export.cli import _datasets

    runs: dict[str, Path] = request.getfixturevalue("trained_runs")
    synth: Path = request.getfixturevalue("synth_dir")
    dataset, train, val, test, _split = _datasets(str(synth), None)
    out = tmp_path_factory.mktemp("bundle") / "bundle"
    build_bundle(
        BuildOptions(
            out=out,
            calib=val,
            vae=runs["vae"],
            ssd=runs["ssd"],
            classifier=runs["classifier"],
            dataset_summary=dataset_summary(dataset, train, val, test),
        )
    )
    export_to = os.environ.get("LINESIDE_EXPORT_TEST_BUNDLE_TO")
    if export_to:
        target = Path(export_to)
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(out, target)
    return out
