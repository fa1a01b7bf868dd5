"""The SSD's starting point: BatchNorm statistics at their defaults, so even a barely trained SSD exports.

GluonCV's SSD expansion layers are symbolic BatchNorms without initialisers of their own; the default
uniform init once gave them negative running variances, which ONNX Runtime turns into NaN."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from lineside.export.models.ssd.kind import init_ssd
from lineside.export.models.ssd.network import PRESETS, build_ssd
from lineside.export.synth import SynthSummary

pytestmark = pytest.mark.export

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", ["tile256-mobilenet0.25", "tile256-mobilenetv2_1.0"])
def test_every_batchnorm_starts_at_its_defaults(preset: str) -> None:
    # given a fresh SSD, initialised as the trainer does (after a first forward has fixed every shape)
    net = build_ssd(PRESETS[preset])
    net.initialize()
    net(mx.nd.zeros((1, 3 if PRESETS[preset].rgb else 1, 256, 256)))
    init_ssd(net, [mx.cpu()])

    # then every running variance is 1 and every running mean 0, the expansion layers' included
    stats = {n: p.data().asnumpy() for n, p in net.collect_params().items() if "_moving_" in n or "_running_" in n}
    assert any("expand" in n for n in stats)  # GluonCV's symbolic BatchNorms are among them
    for name, value in stats.items():
        expected = 1.0 if name.endswith("var") else 0.0
        assert np.all(value == expected), f"{name}: {value.min()}..{value.max()}"


def test_an_ssd_trained_for_one_iteration_builds(synth_set: tuple[Path, SynthSummary], tmp_path: Path) -> None:
    data, _ = synth_set
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "lineside.export.cli", *args]
        return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)

    # given an SSD run stopped after one step (what a tiny budget leaves)
    train = cli(
        "train-ssd", "--data", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--iters", "1",
        "--batch-size", "4", "--preset", "tile256-mobilenet0.25",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]

    # then its running variances are valid, and build's parity check (finite outputs on both runtimes) passes
    saved = mx.nd.load(str(tmp_path / "run" / "model.params"))
    variances = {n: v.asnumpy() for n, v in saved.items() if n.endswith(("moving_var", "running_var"))}
    assert variances and all((v >= 0).all() for v in variances.values())
    built = cli("build", "--ssd", str(tmp_path / "run"), "--calib", str(data), "--out", str(tmp_path / "bundle"))
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "bundle" / "manifest.json").is_file()
