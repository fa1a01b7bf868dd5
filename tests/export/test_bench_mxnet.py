"""`lineside-export bench-mxnet`: the bundle's ONNX Runtime sessions against the same weights in MXNet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.export
mx = pytest.importorskip("mxnet")


def test_bench_mxnet_compares_both_runtimes_on_the_same_weights(
    test_bundle: Path, trained_runs: dict[str, Path], tmp_path: Path
) -> None:
    from lineside.export.cli import main

    # given the bundle and the run folders it was built from (one folder holding classifier/, vae/, ssd/)
    runs = {run.parent for run in trained_runs.values()}
    assert len(runs) == 1
    out = tmp_path / "mx.json"
    # when two frames run through both runtimes
    args = ["--runs", str(runs.pop()), "--frames", "2", "--json", str(out)]
    code = main(["bench-mxnet", "--bundle", str(test_bundle), *args])
    # then the ratio is a positive number, per model too, and both sides ran the same weights
    assert code == 0
    report = json.loads(out.read_text())
    assert report["ort_vs_mxnet_latency_ratio"] > 0
    assert set(report["per_model_ratio"]) == {"classifier", "vae", "ssd"}
    assert all(r > 0 for r in report["per_model_ratio"].values())
    assert report["ort_ms"]["frame"]["n"] == report["mxnet_ms"]["frame"]["n"] == 2
    assert max(report["max_abs_diff_first_frame"].values()) < 0.05


def test_bench_mxnet_refuses_a_runs_folder_without_the_bundles_models(test_bundle: Path, tmp_path: Path) -> None:
    from lineside.agent.errors import ExportError
    from lineside.export.bench_mxnet import bench_mxnet

    # given an empty runs folder
    # when / then the missing run is named
    with pytest.raises(ExportError, match="no run folder"):
        bench_mxnet(test_bundle, tmp_path, frames=1)
