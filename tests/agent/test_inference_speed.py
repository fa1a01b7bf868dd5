"""The CPU speed levers keep their promises: skipped models change no verdict, score or box; the
configured session settings reach every ONNX Runtime session; `bench` reports what it says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lineside.agent.bundle.manifest import BundleManifest
from lineside.agent.cli import main
from lineside.agent.config import InferenceConfig
from lineside.agent.imaging import read_image
from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.settings import SessionSettings, auto_threads
from lineside.agent.models import KindThresholds


@pytest.fixture(scope="module")
def engines(classifier_rule_bundle: Path) -> tuple[InferenceEngine, InferenceEngine]:
    """(skipping unneeded models: the default, running every model on every frame), on the test bundle with
    the rule these tests are written for (classifier decides, VAE and SSD report boxes)."""
    return (
        InferenceEngine.load(classifier_rule_bundle, providers=["cpu"], verify_golden=False),
        InferenceEngine.load(
            classifier_rule_bundle, providers=["cpu"], verify_golden=False, skip_unneeded_models=False
        ),
    )


def _frames(bundle: Path) -> list[np.ndarray]:
    manifest = BundleManifest.read(bundle)
    golden = [read_image(bundle / g.file.path) for g in manifest.golden]
    return golden + [np.ascontiguousarray(g[:, ::-1]) for g in golden] + [np.full((300, 400), 90, np.uint8)]


def _threshold_sets(engine: InferenceEngine) -> dict[str, dict[str, KindThresholds]]:
    """The bundle's own; one where nothing fires (good frames); one where everything fires with boxes."""
    th = engine.thresholds()
    return {
        "bundle": {},
        "quiet": {"classifier": th["classifier"].model_copy(update={"image": 1.0})},
        "loud": {
            "classifier": th["classifier"].model_copy(update={"image": 0.0}),
            "ssd": th["ssd"].model_copy(update={"box": 0.0}),
            "vae": th["vae"].model_copy(update={"pixel": th["vae"].pixel / 4}),
        },
    }


def test_skipping_unneeded_models_changes_no_verdict_score_or_box(
    engines: tuple[InferenceEngine, InferenceEngine], classifier_rule_bundle: Path
) -> None:
    # given the test bundle (decision: the classifier; boxes from the VAE and the SSD)
    lazy, full = engines
    assert lazy.manifest.decision.defective_if_any == ["classifier"]
    assert set(lazy.manifest.decision.report_boxes_from) == {"vae", "ssd"}
    seen = {"good": 0, "defective with boxes": 0}
    for name, overrides in _threshold_sets(lazy).items():
        lazy.set_threshold_overrides(overrides)
        full.set_threshold_overrides(overrides)
        for i, image in enumerate(_frames(classifier_rule_bundle)):
            # when both engines inspect the frame
            a, b = lazy.predict(image), full.predict(image)
            # then verdict, score, firing models and boxes are identical
            where = f"{name} thresholds, frame {i}"
            assert (a.is_defective, a.score, a.fired) == (b.is_defective, b.score, b.fired), where
            assert a.boxes == b.boxes, where
            assert a.model_scores == {k: b.model_scores[k] for k in a.model_scores}, where
            seen["good" if not a.is_defective else "defective with boxes" if a.boxes else "defective"] = 1
    lazy.set_threshold_overrides({})
    full.set_threshold_overrides({})
    assert seen["good"] and seen["defective with boxes"], "the frames must cover both verdicts"


def test_a_good_frame_runs_only_the_models_the_decision_needs(
    engines: tuple[InferenceEngine, InferenceEngine], classifier_rule_bundle: Path
) -> None:
    # given thresholds at which the classifier, the only model of the decision, does not fire
    lazy, full = engines
    lazy.set_threshold_overrides(_threshold_sets(lazy)["quiet"])
    try:
        # when a frame is inspected
        prediction = lazy.predict(_frames(classifier_rule_bundle)[0])
    finally:
        lazy.set_threshold_overrides({})
    # then neither localiser ran: no score, no time spent
    assert not prediction.is_defective
    assert set(prediction.model_scores) == {"classifier"}
    assert not {"vae", "ssd", "vae_post", "ssd_post"} & set(prediction.timings_ms)
    # while the engine told to run everything ran all three
    assert set(full.predict(_frames(classifier_rule_bundle)[0]).model_scores) == {"classifier", "vae", "ssd"}


def test_a_defective_frame_gets_the_localisers_boxes(engines: tuple[InferenceEngine, InferenceEngine]) -> None:
    # given thresholds at which everything fires and every candidate box is reported
    lazy, _ = engines
    lazy.set_threshold_overrides(_threshold_sets(lazy)["loud"])
    try:
        # when a frame with a bright blob is inspected
        image = np.full((300, 400), 90, np.uint8)
        image[100:140, 150:200] = 200
        prediction = lazy.predict(image)
    finally:
        lazy.set_threshold_overrides({})
    # then both localisers ran and reported boxes
    assert prediction.is_defective
    assert {"vae", "ssd"} <= set(prediction.model_scores)
    assert {d.source for d in prediction.boxes} == {"vae", "ssd"}


def test_a_model_in_the_decision_rule_runs_on_every_frame(test_bundle: Path, tmp_path: Path) -> None:
    # given a bundle whose decision is "the VAE fires" (the VAE must run on every frame)
    copy = tmp_path / "b"
    shutil.copytree(test_bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["decision"] = {"defective_if_any": ["vae"], "report_boxes_from": ["ssd"]}
    (copy / "manifest.json").write_text(json.dumps(data))
    engine = InferenceEngine.load(copy, providers=["cpu"], verify_golden=False)
    th = engine.thresholds()["vae"]
    engine.set_threshold_overrides({"vae": th.model_copy(update={"image": th.image * 4})})
    # when a frame the VAE does not flag is inspected
    prediction = engine.predict(_frames(test_bundle)[0])
    # then the VAE ran, the SSD (boxes only) did not, and the classifier (in neither list) never runs
    assert not prediction.is_defective
    assert set(prediction.model_scores) == {"vae"}
    engine.close()


def test_session_settings_reach_every_onnx_runtime_session(test_bundle: Path) -> None:
    # given explicit settings
    settings = SessionSettings(intra_op_threads=2, allow_spinning=True, graph_optimization="basic")
    # when an engine is built with them
    engine = InferenceEngine.load(test_bundle, providers=["cpu"], session=settings, verify_golden=False)
    # then each session runs with them
    for runner in engine._runners.values():
        options = runner.session.get_session_options()
        assert options.intra_op_num_threads == 2
        assert options.graph_optimization_level.name == "ORT_ENABLE_BASIC"
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    engine.close()


def test_default_settings_use_the_usable_cores_and_do_not_spin() -> None:
    # given the config defaults
    settings = InferenceConfig().session_settings()
    # then: auto threads (the usable cores, at most 8), no spinning, every graph optimisation
    assert settings.intra_op_threads == 0
    assert [auto_threads(n) for n in (1, 2, 4, 16, 64)] == [1, 2, 4, 8, 8]
    options = settings.session_options()
    assert options.intra_op_num_threads == auto_threads()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.graph_optimization_level.name == "ORT_ENABLE_ALL"


def test_bench_writes_its_figures_for_a_few_frames(test_bundle: Path, tmp_path: Path) -> None:
    # given the test bundle and no images (the bench tiles the golden images into 768x572 frames)
    out = tmp_path / "bench.json"
    # when a short bench runs
    args = ["--frames", "4", "--rounds", "2", "--warmup", "1", "--threads", "1,2", "--json", str(out)]
    code = main(["bench", "--bundle", str(test_bundle), *args])
    # then its JSON holds the figures the issue asks for, ratios and rates positive
    assert code == 0
    report = json.loads(out.read_text())
    for key in ("pipeline_fps", "bare_ort_fps", "ratio_vs_bare_ort", "rss_mb"):
        assert isinstance(report[key], float) and report[key] > 0, key
    assert report["providers"] == ["CPUExecutionProvider"]
    assert report["images"]["sizes"] == ["768x572 uint8"]
    # the models the bundle's decision needs ran on every frame
    needed = json.loads((test_bundle / "manifest.json").read_text())["decision"]["defective_if_any"]
    assert {"decode", "preprocess", "total", *needed} <= set(report["stages_ms"])
    # the bare loop does the engine's model work: at least the needed models, at most all of them
    models = json.loads((test_bundle / "manifest.json").read_text())["models"]
    assert len(needed) <= report["bare_models_per_frame"] <= len(models)
    assert set(report["threads_ms"]) == {"1", "2"}
    machine = report["machine"]
    assert machine["cpu"] and machine["usable_cores"] >= 1 and machine["onnxruntime"]
    # no NVIDIA driver here: no GPU figures, and no failure either
    assert report["gpu"] is None or report["gpu"]["devices"]


@pytest.mark.gpu
def test_bench_on_a_gpu_reports_its_memory_and_the_gpu_provider(test_bundle: Path, tmp_path: Path) -> None:
    # given a GPU machine
    out = tmp_path / "bench.json"
    # when a short bench runs on CUDA
    args = ["--frames", "4", "--rounds", "2", "--warmup", "1", "--providers", "cuda,cpu", "--json", str(out)]
    assert main(["bench", "--bundle", str(test_bundle), *args]) == 0
    # then the GPU, its driver and the memory in use are reported
    report = json.loads(out.read_text())
    assert "CUDAExecutionProvider" in report["providers"]
    assert report["gpu"]["driver"] and report["gpu"]["devices"][0]["name"]
    assert report["gpu"]["devices"][0]["used_mb"] > 0
