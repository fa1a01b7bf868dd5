"""The export stage end to end: real MXNet training -> ONNX -> parity -> calibrated, checksummed bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from lineside.agent.bundle.loader import load_bundle, sha256_file
from lineside.agent.bundle.manifest import BundleManifest
from lineside.agent.errors import BundleError, ExportError

pytestmark = pytest.mark.export
mx = pytest.importorskip("mxnet")


def test_bundle_holds_three_verified_models_with_parity_and_checksums(test_bundle: Path) -> None:
    # given a bundle built from the trained runs
    manifest = BundleManifest.read(test_bundle)
    # then every model was exported, passed parity within its stated tolerance, and is checksummed
    assert set(manifest.models) == {"classifier", "vae", "ssd"}
    for kind, spec in manifest.models.items():
        assert spec.parity.passed, kind
        assert spec.parity.images > 0
        for name, diff in spec.parity.max_abs_diff.items():
            assert diff <= spec.parity.tolerance[name], (kind, name, diff)
        assert sha256_file(test_bundle / spec.file.path) == spec.file.sha256
        assert spec.input.shape[0] == -1, "batch axis must be dynamic"
        assert spec.training is not None and spec.training.epochs == 2
    assert manifest.models["ssd"].parity.detections_compared is not None
    # and thresholds, the decision rule and golden images were recorded
    assert manifest.decision.defective_if_any
    assert 1 <= len(manifest.golden) <= 4
    assert manifest.exporter["mxnet"] == "1.9.1"
    assert manifest.dataset is not None and manifest.dataset.val_groups


def test_tarball_beside_the_folder_loads_and_verifies(test_bundle: Path) -> None:
    # given the archive written beside the bundle folder
    archive = test_bundle.parent / f"{test_bundle.name}.tar.gz"
    # when it is opened as a bundle
    loaded = load_bundle(archive)
    # then it holds the same manifest
    assert loaded.manifest.bundle_id == BundleManifest.read(test_bundle).bundle_id
    with tarfile.open(archive) as tar:
        assert f"{test_bundle.name}/manifest.json" in tar.getnames()


def test_tampered_model_file_is_named_in_the_error(test_bundle: Path, tmp_path: Path) -> None:
    # given a copy of the bundle whose SSD file changed by one byte
    copy = tmp_path / "b"
    shutil.copytree(test_bundle, copy)
    onnx_file = copy / "ssd.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    # when it is loaded, then the error names the file and both checksums
    with pytest.raises(BundleError, match=r"ssd\.onnx: sha256 is [0-9a-f]{64}, manifest says"):
        load_bundle(copy)


def test_failed_build_leaves_no_bundle_behind(trained_runs: dict[str, Path], synth_dir: Path, tmp_path: Path) -> None:
    from lineside.export.build import BuildOptions, build_bundle
    from lineside.export.data import open_dataset

    # given a classifier run whose parameters are truncated
    broken = tmp_path / "cls"
    shutil.copytree(trained_runs["classifier"], broken)
    params = broken / "model.params"
    params.write_bytes(params.read_bytes()[:1000])
    out = tmp_path / "out" / "bundle"
    # when the build runs, then it fails and leaves neither folder, archive nor temporary files
    with pytest.raises(mx.base.MXNetError):
        build_bundle(BuildOptions(out=out, calib=open_dataset(synth_dir), runs={"classifier": broken}))
    assert not out.exists()
    assert list((tmp_path / "out").iterdir()) == []


def test_build_refuses_to_overwrite_without_force(
    trained_runs: dict[str, Path], synth_dir: Path, tmp_path: Path
) -> None:
    from lineside.export.build import BuildOptions, build_bundle
    from lineside.export.data import open_dataset

    out = tmp_path / "bundle"
    out.mkdir()
    with pytest.raises(ExportError, match="already exists"):
        build_bundle(
            BuildOptions(out=out, calib=open_dataset(synth_dir), runs={"classifier": trained_runs["classifier"]})
        )


def test_evaluate_cli_prints_the_study_table_and_writes_json(
    test_bundle: Path, synth_dir: Path, tmp_path: Path
) -> None:
    # when the bundle is evaluated on the synthetic test split
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lineside.export.cli",
            "evaluate",
            "--bundle",
            str(test_bundle),
            "--data",
            str(synth_dir),
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # then it prints one row per method and the JSON holds figures in [0, 1]
    assert proc.returncode == 0, proc.stderr
    for method in ("classifier", "vae", "ssd", "combined"):
        assert method in proc.stdout
    report = json.loads(report_path.read_text())
    combined = report["methods"]["combined"]
    assert 0.0 <= combined["study"]["avg_f1"] <= 1.0
    assert 0.0 <= combined["image"]["f1"] <= 1.0
    assert report["images"] > 0
    # and the decision per test series adds up to the whole, each recall the series' own
    per_group = report["per_group"]
    assert set(per_group) == set(report["test_groups"]) and "per series" in proc.stdout
    assert sum(g["images"] for g in per_group.values()) == report["images"]
    assert sum(g["defective"] for g in per_group.values()) == report["defective_images"]
    caught = sum(g["recall"] * g["defective"] for g in per_group.values() if g["defective"])
    assert caught == pytest.approx(report["operating_point"]["recall"] * report["defective_images"])


def test_train_cli_rejects_a_missing_dataset_path(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lineside.export.cli",
            "train-vae",
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1  # a failure, not argparse's usage code 2
    assert "nope" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_train_cli_rejects_an_empty_training_set(tmp_path: Path) -> None:
    # given a GDXray-layout folder whose only series has a ground-truth file but no image
    series = tmp_path / "data" / "Castings" / "C0001"
    series.mkdir(parents=True)
    (series / "ground_truth.txt").write_text("")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lineside.export.cli",
            "train-ssd",
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1  # a failure, not argparse's usage code 2
    assert "error:" in proc.stderr
    assert not (tmp_path / "r" / "model.params").exists()
