"""The inference engine on a real bundle built by our export stage, on CPU."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lineside.agent.bundle.manifest import BundleManifest
from lineside.agent.errors import BundleError, InferenceError
from lineside.agent.imaging import read_image
from lineside.agent.inference.engine import InferenceEngine


@pytest.fixture(scope="module")
def engine(test_bundle: Path) -> InferenceEngine:
    # Every model on every frame: these tests are about each model's outputs (skipping: test_inference_speed.py).
    return InferenceEngine.load(test_bundle, providers=["cpu"], skip_unneeded_models=False)


def _copy_with_manifest(bundle: Path, tmp_path: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of the bundle whose manifest.json was changed by `edit`."""
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


def _golden_image(bundle: Path) -> np.ndarray:
    manifest = BundleManifest.read(bundle)
    return read_image(bundle / manifest.golden[0].file.path)


def test_load_reports_the_providers_actually_used(engine: InferenceEngine) -> None:
    assert engine.providers_in_use == ["CPUExecutionProvider"]


def _loud(engine: InferenceEngine) -> dict:
    """Thresholds at which every model fires and every candidate box is reported."""
    bundle = engine.thresholds()
    return {
        "classifier": bundle["classifier"].model_copy(update={"image": 0.0}),
        "ssd": bundle["ssd"].model_copy(update={"image": 0.0, "box": 0.0}),
        "vae": bundle["vae"].model_copy(update={"image": 0.0, "pixel": 0.0}),
    }


def test_prediction_boxes_lie_in_original_pixels(engine: InferenceEngine, test_bundle: Path) -> None:
    # given a golden image (not a multiple of the tile size)
    image = _golden_image(test_bundle)
    h, w = image.shape
    # when inspected with the bundle's thresholds, and with every candidate box reported
    prediction = engine.predict(image)
    loud = engine.decide(engine.analyze(image), _loud(engine))
    # then the verdict agrees with the calibrated score and every box (there are some) lies inside the image
    assert prediction.is_defective == (prediction.score >= 0.5)
    assert set(prediction.model_scores) == {"classifier", "vae", "ssd"}
    assert loud.boxes and {box.source for box in loud.boxes} <= set(engine.manifest.decision.report_boxes_from)
    for box in loud.boxes:
        assert 0 <= box.x1 < box.x2 <= w and 0 <= box.y1 < box.y2 <= h
    assert prediction.timings_ms["ssd"] > 0


def test_sixteen_bit_image_gives_the_same_scores_as_eight_bit(engine: InferenceEngine, test_bundle: Path) -> None:
    # given the same radiograph as 8-bit and as full-range 16-bit
    image8 = _golden_image(test_bundle)
    image16 = image8.astype(np.uint16) * 257
    # when both are inspected
    p8, p16 = engine.predict(image8), engine.predict(image16)
    # then the scores agree (same normalised intensities)
    for kind, score in p8.model_scores.items():
        assert p16.model_scores[kind] == pytest.approx(score, abs=1e-4), kind


def test_twelve_bit_data_in_sixteen_bit_words_uses_bits_stored(engine: InferenceEngine, test_bundle: Path) -> None:
    # given an 8-bit radiograph on multiples of 17 and the same intensities as 12-bit data in 16-bit words:
    # 17 k / 255 and 273 k / 4095 are the same quotient, so both give the same float32 input
    # (a barely trained test model moves by a lot for a fraction of a grey level: no approximate copy will do)
    image8 = (_golden_image(test_bundle) // 17 * 17).astype(np.uint8)
    image12 = (image8.astype(np.uint16) // 17 * 273).astype(np.uint16)
    # when both are inspected, the 12-bit one with its bits_stored, and once without it
    p8, p12 = engine.predict(image8), engine.predict(image12, bits_stored=12)
    as16 = engine.predict(image12)
    # then bits_stored gives the 8-bit image's scores, and reading the words as 16-bit data does not
    assert p12.model_scores == pytest.approx(p8.model_scores, abs=1e-6)
    assert as16.model_scores != pytest.approx(p8.model_scores, abs=1e-3)


def test_golden_check_passes_on_the_built_bundle(engine: InferenceEngine) -> None:
    engine.check_golden()


def test_missing_model_file_is_named(test_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "b"
    shutil.copytree(test_bundle, copy)
    (copy / "vae.onnx").unlink()
    with pytest.raises(BundleError, match=r"vae\.onnx: missing"):
        InferenceEngine.load(copy, providers=["cpu"])


def test_manifest_with_unknown_key_is_refused(test_bundle: Path, tmp_path: Path) -> None:
    copy = _copy_with_manifest(test_bundle, tmp_path, lambda m: m.update(surprise=1))
    with pytest.raises(BundleError, match="surprise"):
        InferenceEngine.load(copy, providers=["cpu"])


def test_changed_expected_output_fails_the_golden_check(test_bundle: Path, tmp_path: Path) -> None:
    # given a bundle whose golden expectation was altered (a model that no longer behaves as exported)
    def shift(m: dict) -> None:
        m["golden"][0]["expected_scores"]["classifier"] += 0.25

    copy = _copy_with_manifest(test_bundle, tmp_path, shift)
    # then loading refuses it before it could serve a frame
    with pytest.raises(BundleError, match="golden-image check failed"):
        InferenceEngine.load(copy, providers=["cpu"])


def test_path_outside_the_bundle_is_refused(test_bundle: Path, tmp_path: Path) -> None:
    copy = _copy_with_manifest(
        test_bundle, tmp_path, lambda m: m["models"]["vae"]["file"].update(path="../../etc/passwd")
    )
    with pytest.raises(BundleError, match="outside the bundle"):
        InferenceEngine.load(copy, providers=["cpu"])


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers() and Path("/dev/nvidia0").exists(),
    reason="a GPU is present here",
)
def test_require_gpu_without_a_gpu_is_a_clear_startup_error(test_bundle: Path) -> None:
    with pytest.raises(InferenceError, match="require_gpu"):
        InferenceEngine.load(test_bundle, providers=["cuda", "cpu"], require_gpu=True)


def test_unknown_provider_name_is_refused(test_bundle: Path) -> None:
    with pytest.raises(InferenceError, match="unknown execution provider 'npu'"):
        InferenceEngine.load(test_bundle, providers=["npu"])


def test_non_2d_image_is_refused(engine: InferenceEngine) -> None:
    with pytest.raises(InferenceError, match="2-D"):
        engine.predict(np.zeros((10, 10, 3), np.uint8))


@pytest.mark.gpu
def test_cuda_provider_is_used_when_a_gpu_is_present(test_bundle: Path) -> None:
    engine = InferenceEngine.load(test_bundle, providers=["cuda", "cpu"], require_gpu=True)
    assert "CUDAExecutionProvider" in engine.providers_in_use
    engine.check_golden(tolerance_scale=10)


@pytest.mark.gpu
def test_tensorrt_fp16_provider_matches_cpu_within_tolerance(test_bundle: Path, tmp_path: Path) -> None:
    cpu = InferenceEngine.load(test_bundle, providers=["cpu"])
    trt = InferenceEngine.load(
        test_bundle,
        providers=["tensorrt", "cuda", "cpu"],
        require_gpu=True,
        trt_cache_dir=tmp_path,
        verify_golden=False,
    )
    image = _golden_image(test_bundle)
    a, b = cpu.predict(image), trt.predict(image)
    for kind, score in a.model_scores.items():
        assert b.model_scores[kind] == pytest.approx(score, abs=0.02), kind


def test_boxes_come_only_with_a_defective_verdict(engine: InferenceEngine, test_bundle: Path) -> None:
    # given thresholds so high that no model fires, and so low that every model fires
    outputs = engine.analyze(_golden_image(test_bundle))
    bundle = engine.thresholds()
    never = {
        "classifier": bundle["classifier"].model_copy(update={"image": 2.0}),
        "ssd": bundle["ssd"].model_copy(update={"image": 2.0, "box": 0.0}),
        "vae": bundle["vae"].model_copy(update={"image": 1e9, "pixel": 0.0}),
    }
    always = _loud(engine)
    # when the decision rule is applied
    quiet, loud = engine.decide(outputs, never), engine.decide(outputs, always)
    # then a good verdict carries no boxes, a defective one carries the localisers' boxes
    assert not quiet.is_defective and quiet.boxes == () and quiet.score < 0.5
    assert loud.is_defective and loud.score >= 0.5 and len(loud.boxes) > 0


def _archive(bundle: Path, out: Path) -> Path:
    archive = out / "bundle.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle, arcname="bundle")
    return archive


@pytest.fixture
def own_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private temporary-files folder, so what the loader leaves behind can be counted."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_an_archive_bundle_leaves_no_folder_behind(test_bundle: Path, tmp_path: Path, own_tmpdir: Path) -> None:
    # given the bundle as .tar.gz
    archive = _archive(test_bundle, tmp_path)

    # when it is loaded, used and closed
    engine = InferenceEngine.load(archive, providers=["cpu"])
    extracted = list(own_tmpdir.iterdir())
    prediction = engine.predict(_golden_image(test_bundle))
    engine.close()

    # then it was served from one extracted folder, removed on close
    assert len(extracted) == 1 and prediction.model_scores
    assert list(own_tmpdir.iterdir()) == []


def test_a_tampered_archive_is_refused_and_leaves_no_folder_behind(
    test_bundle: Path, tmp_path: Path, own_tmpdir: Path
) -> None:
    # given an archive whose SSD anchors were changed after the build
    copy = tmp_path / "b"
    shutil.copytree(test_bundle, copy)
    anchors = np.load(copy / "ssd_anchors.npy")
    np.save(copy / "ssd_anchors.npy", anchors * 1.01)
    archive = _archive(copy, tmp_path)

    # when / then
    with pytest.raises(BundleError, match=r"ssd_anchors\.npy: sha256 is"):
        InferenceEngine.load(archive, providers=["cpu"])
    assert list(own_tmpdir.iterdir()) == []


def test_an_unreadable_bundle_file_is_a_clear_error_naming_it(
    test_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given a model file the service user may not read (simulated: tests run as root)
    from lineside.agent.bundle import loader

    real = loader.sha256_file

    def sha256_file(path: Path) -> str:
        if path.name == "vae.onnx":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(loader, "sha256_file", sha256_file)

    # when / then: a BundleError naming the file, not a raw PermissionError
    with pytest.raises(BundleError, match=r"vae\.onnx: cannot read \(Permission denied\)"):
        InferenceEngine.load(test_bundle, providers=["cpu"])


def test_an_unreadable_manifest_is_a_clear_error_naming_it(test_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # given
    real = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self.name == "manifest.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)

    # when / then
    with pytest.raises(BundleError, match=r"manifest\.json: cannot read the manifest \(Permission denied\)"):
        InferenceEngine.load(test_bundle, providers=["cpu"])


def test_a_tampered_golden_image_is_refused_naming_it(test_bundle: Path, tmp_path: Path) -> None:
    # given a copy whose first golden image lost its last byte
    copy = tmp_path / "b"
    shutil.copytree(test_bundle, copy)
    golden = BundleManifest.read(copy).golden[0].file.path
    (copy / golden).write_bytes((copy / golden).read_bytes()[:-1])

    # when / then: refused by checksum before any image is run
    with pytest.raises(BundleError, match=re.escape(f"{golden}: sha256 is")):
        InferenceEngine.load(copy, providers=["cpu"])


def test_a_missing_anchors_file_is_refused_naming_it(test_bundle: Path, tmp_path: Path) -> None:
    # given a folder copy without the SSD anchors
    copy = tmp_path / "b"
    shutil.copytree(test_bundle, copy)
    (copy / "ssd_anchors.npy").unlink()

    # when / then
    with pytest.raises(BundleError, match=r"ssd_anchors\.npy: missing"):
        InferenceEngine.load(copy, providers=["cpu"])


def test_threshold_overrides_apply_to_predict_until_cleared(classifier_rule_bundle: Path) -> None:
    # given a bundle whose rule includes the classifier, the golden image and its verdict with the bundle's thresholds
    engine = InferenceEngine.load(classifier_rule_bundle, providers=["cpu"], verify_golden=False)
    image = _golden_image(classifier_rule_bundle)
    bundle = engine.thresholds()
    plain = engine.predict(image)
    try:
        # when the classifier's threshold is overridden to fire on anything, then to (almost) never fire
        engine.set_threshold_overrides({"classifier": bundle["classifier"].model_copy(update={"image": 0.0})})
        loud = engine.predict(image)
        engine.set_threshold_overrides({"classifier": bundle["classifier"].model_copy(update={"image": 1.0})})
        quiet = engine.predict(image)
        # then the verdict follows the override, the raw scores do not move, and the bundle's values stay
        assert loud.is_defective and "classifier" in loud.fired
        assert "classifier" not in quiet.fired or plain.model_scores["classifier"] >= 1.0
        shared = loud.model_scores.keys() & plain.model_scores.keys()  # a good verdict runs fewer models
        assert "classifier" in shared
        assert {k: loud.model_scores[k] for k in shared} == pytest.approx({k: plain.model_scores[k] for k in shared})
        # (a good verdict skips the localisers that only report boxes: their scores are absent)
        assert quiet.model_scores == pytest.approx({k: plain.model_scores[k] for k in quiet.model_scores})
        assert engine.thresholds() == bundle
        assert engine.effective_thresholds()["classifier"].image == 1.0
    finally:
        engine.set_threshold_overrides({})
    # and once cleared, the bundle's verdict is back
    assert engine.predict(image).is_defective == plain.is_defective
    assert engine.threshold_overrides() == {}


def test_an_override_outside_the_bundle_bounds_or_for_an_unknown_kind_is_refused_and_changes_nothing(
    engine: InferenceEngine,
) -> None:
    bundle = engine.thresholds()
    vae_high = bundle["vae"].bounds()["image"][1]
    bad = [
        {"classifier": bundle["classifier"].model_copy(update={"image": 1.5})},
        {"vae": bundle["vae"].model_copy(update={"image": vae_high * 2})},
        {"nope": bundle["classifier"]},
        {"ssd": bundle["classifier"]},
    ]
    for overrides in bad:
        with pytest.raises(ValueError):
            engine.set_threshold_overrides(overrides)
        assert engine.threshold_overrides() == {}
