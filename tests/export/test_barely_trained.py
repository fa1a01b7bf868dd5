"""Barely trained models (a tiny budget, a test bundle) still give a working bundle whose models rank images.

- GluonCV's SSD expansion layers are symbolic BatchNorms without initialisers of their own; the default
  uniform init once gave them negative running variances, which ONNX Runtime turns into NaN.
- After a few steps BatchNorm's running statistics are still near their start: in inference every image
  got the same score. `refresh_batch_stats` re-estimates them while a run has fewer than STATS_WARM_STEPS."""

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


def test_refreshing_batch_statistics_moves_them_to_the_batches_and_leaves_the_weights() -> None:
    from mxnet.gluon import nn

    from lineside.export.train import STATS_BATCHES, refresh_batch_stats

    # given a fresh conv + BatchNorm (running mean 0) and training inputs far from that
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3, in_channels=1), nn.BatchNorm(in_channels=4), nn.Activation("relu"))
    net.initialize(mx.init.Xavier())
    net.hybridize(static_alloc=True, static_shape=True)
    x = mx.nd.array(np.random.default_rng(0).random((4, 1, 32, 32)).astype(np.float32) * 2 + 5)
    bn = net[1]
    weights = {n: p.data().asnumpy().copy() for n, p in net.collect_params().items() if "running" not in n}

    # when the statistics are refreshed on those inputs
    refresh_batch_stats(net, lambda: [(x,)])

    # then the running mean is that of the BatchNorm's inputs, up to what momentum leaves of the start (0)
    batch_mean = net[0](x).mean(axis=(0, 2, 3)).asnumpy()
    left = 0.9**STATS_BATCHES
    assert np.abs(batch_mean).min() > 0.1  # the start is far from the batches
    assert bn.running_mean.data().asnumpy() == pytest.approx((1 - left) * batch_mean, rel=1e-4)
    # and no weight moved
    for name, value in weights.items():
        assert np.array_equal(net.collect_params()[name].data().asnumpy(), value), name


def test_the_test_bundles_models_rank_images(test_bundle: Path, synth_dir: Path) -> None:
    from lineside.agent.inference.engine import InferenceEngine
    from lineside.export.data import datasets_for

    # given the bundle trained for a few steps, as every agent test uses it
    engine = InferenceEngine.load(test_bundle, providers=["cpu"])
    _, _, val, _, _ = datasets_for(str(synth_dir), None)

    # when it scores the calibration images
    scores = [engine.analyze(s.load()).models for s in val.samples]

    # then no model gives every image the same score (one that does was calibrated right at it)
    for kind in engine.manifest.models:
        distinct = {round(m[kind].score, 6) for m in scores}
        assert len(distinct) > len(scores) // 2, (kind, sorted(distinct)[:5])
