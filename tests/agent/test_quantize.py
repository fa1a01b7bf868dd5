"""`lineside-export quantize`: an INT8 copy of a real bundle that the agent proves like any other.

ONNX Runtime's quantisation tools need onnx >= 1.16, which only the agent environment (with the quantize
extra) has; in the export environment (onnx 1.14 for MXNet) the command must say so instead.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lineside.agent.bundle.loader import load_bundle, sha256_file
from lineside.agent.errors import ExportError
from lineside.agent.imaging import read_image
from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.models.base import calibrated_score
from lineside.export.quantize import MIN_ONNX, QuantizeOptions, quantize_bundle


def _onnx_version() -> tuple[int, ...] | None:
    try:
        import onnx
    except ImportError:
        return None
    return tuple(int(p) for p in onnx.__version__.split(".")[:2])


HAS_TOOLS = (_onnx_version() or (0,)) >= MIN_ONNX
needs_tools = pytest.mark.skipif(not HAS_TOOLS, reason="needs onnx >= 1.16 (the agent environment's quantize extra)")


@pytest.fixture(scope="module")
def clear_bundle(test_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test bundle with every image threshold at half its models' lowest golden score: each golden verdict
    clear of the boundary (calibrated scores >= 0.75).

    Why: the test bundle's models are trained for 20 steps; their scores barely differ from image to image,
    so calibration puts thresholds right at them (a golden image decided at 0.502), well inside INT8's
    noise, and quantising it as it is refuses it, rightly. Flips are tested on purpose-made copies below.
    """
    target = tmp_path_factory.mktemp("clear") / "bundle"
    shutil.copytree(test_bundle, target)
    manifest = json.loads((target / "manifest.json").read_text())
    for kind, spec in manifest["models"].items():
        lowest = min(g["expected_scores"][kind] for g in manifest["golden"])
        assert lowest > 0, kind
        spec["thresholds"]["image"] = lowest / 2
    for g in manifest["golden"]:
        g["expected_is_defective"] = True
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.fixture(scope="module")
def int8_bundle(clear_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    if not HAS_TOOLS:
        pytest.skip("needs onnx >= 1.16 (the agent environment's quantize extra)")
    out = tmp_path_factory.mktemp("int8") / "bundle"
    summary = quantize_bundle(QuantizeOptions(bundle=clear_bundle, out=out, images=[clear_bundle / "golden"]))
    return out, summary


@needs_tools
def test_the_int8_bundle_is_verified_and_proves_its_golden_images(int8_bundle: tuple[Path, dict], clear_bundle: Path):
    # given the test bundle quantised (every model), calibrated on its golden images given as --images too
    out, summary = int8_bundle
    source = load_bundle(clear_bundle).manifest

    # when the agent loads it the way a station does (sha256 of every file, golden images replayed)
    engine = InferenceEngine.load(out, providers=["cpu"])
    manifest = engine.manifest

    # then it is a new bundle of int8 graphs that records where each came from; the decision is unchanged
    assert manifest.bundle_id != source.bundle_id and manifest.version == f"{source.version}-int8"
    assert manifest.decision == source.decision
    for kind, spec in manifest.models.items():
        import onnx

        graph = onnx.load(str(out / spec.file.path)).graph
        ops = {n.op_type for n in graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, kind
        assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.initializer), kind
        q = spec.quantization
        assert q is not None and q.fp32_sha256 == source.models[kind].file.sha256
        assert q.frames == 2 * len(source.golden) and q.real_frames == len(source.golden)
        assert spec.thresholds == source.models[kind].thresholds
        assert set(q.max_abs_diff) == {o.name for o in spec.outputs}
        assert not (out / source.models[kind].file.path).exists()  # the float32 graph is not shipped
    assert summary["verdict_flips"] == 0
    # and the archive beside it is the same bundle
    assert load_bundle(out.parent / "bundle.tar.gz").manifest.bundle_id == manifest.bundle_id
    engine.close()


@needs_tools
def test_int8_scores_stay_close_to_float32_on_every_golden_image(int8_bundle: tuple[Path, dict], clear_bundle: Path):
    # given both bundles
    out, _ = int8_bundle
    fp32, int8 = InferenceEngine.load(clear_bundle), InferenceEngine.load(out)

    # when both judge the golden images
    for golden in fp32.manifest.golden:
        image = read_image(clear_bundle / golden.file.path)
        a, b = fp32.decide(fp32.analyze(image)), int8.decide(int8.analyze(image))

        # then each model's image score moves by little, and the verdict not at all
        assert a.is_defective == b.is_defective
        for kind, score in a.model_scores.items():
            assert abs(score - b.model_scores[kind]) < 0.05 * max(1.0, abs(score)), (golden.file.path, kind)
    # and the recorded figure is the one measured
    recorded = max(s.quantization.max_score_diff for s in int8.manifest.models.values())  # type: ignore[union-attr]
    assert 0 < recorded < 0.05 * max(1.0, max(abs(v) for g in fp32.manifest.golden for v in g.expected_scores.values()))


@needs_tools
def test_only_the_models_asked_for_are_quantised(test_bundle: Path, tmp_path: Path):
    out = tmp_path / "ssd-only"
    quantize_bundle(QuantizeOptions(bundle=test_bundle, out=out, models=["ssd"]))
    manifest = load_bundle(out).manifest
    assert manifest.models["ssd"].quantization is not None
    assert manifest.models["vae"].quantization is None and manifest.models["classifier"].quantization is None
    assert sha256_file(out / "vae.onnx") == load_bundle(test_bundle).manifest.models["vae"].file.sha256


@needs_tools
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"models": ["ssd", "detr"]}, r"--models names \['detr'\]"),
        ({"images": [Path("/nonexistent/frames")]}, "/nonexistent/frames: no such file or folder"),
        ({"max_tiles": 0}, "--max-tiles must be at least 1"),
    ],
)
def test_bad_options_get_an_error_naming_them(test_bundle: Path, tmp_path: Path, change: dict, message: str):
    with pytest.raises(ExportError, match=message):
        quantize_bundle(QuantizeOptions(bundle=test_bundle, out=tmp_path / "b", **change))
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))


@needs_tools
def test_an_undecodable_calibration_image_is_named(test_bundle: Path, tmp_path: Path):
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(ExportError, match=r"cut\.png"):
        quantize_bundle(QuantizeOptions(bundle=test_bundle, out=tmp_path / "b", images=[frames]))


@needs_tools
def test_an_int8_bundle_is_not_quantised_twice_and_out_is_not_overwritten(
    int8_bundle: tuple[Path, dict], tmp_path: Path
):
    out, _ = int8_bundle
    with pytest.raises(ExportError, match="INT8 already"):
        quantize_bundle(QuantizeOptions(bundle=out, out=tmp_path / "again"))
    with pytest.raises(ExportError, match="already exists; pass --force"):
        quantize_bundle(QuantizeOptions(bundle=out, out=out))


@needs_tools
def test_the_command_prints_the_differences_and_writes_json(test_bundle: Path, tmp_path: Path):
    out, report = tmp_path / "b", tmp_path / "q.json"
    done = subprocess.run(
        [sys.executable, "-m", "lineside.export.cli", "quantize", "--bundle", str(test_bundle), "--out", str(out),
         "--models", "ssd", "--json", str(report)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ssd: INT8 on" in done.stdout and "max |fp32 - int8|: class_probs" in done.stdout
    summary = json.loads(report.read_text())
    assert set(summary["models"]) == {"ssd"} and summary["models"]["ssd"]["tiles"] > 0
    assert np.isfinite(summary["models"]["ssd"]["max_abs_diff"]["box_deltas"])


@pytest.mark.skipif(HAS_TOOLS, reason="this environment has the quantisation tools")
def test_without_the_tools_the_command_says_which_environment_to_use(test_bundle: Path, tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "lineside.export.cli", "quantize", "--bundle", str(test_bundle), "--out",
         str(tmp_path / "b")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "needs onnx >= 1.16" in done.stderr and "pip install '.[agent,quantize]'" in done.stderr
    assert not (tmp_path / "b").exists()


def _tiny_deconv_graph(bn: bool, **attrs: object):
    """image (N, 3, 6, 5) -> ConvTranspose (3 -> 4 channels) [-> BatchNormalization] -> out."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(2)
    conv = {"kernel_shape": [4, 4], "strides": [2, 2], "pads": [1, 1, 1, 1], **attrs}
    k = conv["kernel_shape"][0]  # type: ignore[index]
    inits = [
        numpy_helper.from_array(rng.normal(size=(3, 4, k, k)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b"),
    ]
    nodes = [helper.make_node("ConvTranspose", ["image", "w", "b"], ["up" if bn else "out"], **conv)]
    if bn:
        for name, value in [("g", rng.uniform(0.5, 2, 4)), ("be", rng.normal(size=4)), ("m", rng.normal(size=4)),
                            ("v", rng.uniform(0.1, 3, 4))]:  # fmt: skip
            inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        nodes.append(helper.make_node("BatchNormalization", ["up", "g", "be", "m", "v"], ["out"], epsilon=1e-3))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [None, 3, 6, 5])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["n", "c", "h", "w"])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _run(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x})[0]


@pytest.mark.parametrize("bn", [False, True])
def test_phase_convolutions_compute_the_transposed_convolution(bn: bool):
    from lineside.export.phase_convs import deconv_as_phase_convs

    # given a stride-2 kernel-4 ConvTranspose with bias (and a BatchNormalization after it)
    model = _tiny_deconv_graph(bn)
    x = np.random.default_rng(3).normal(size=(2, 3, 6, 5)).astype(np.float32)

    # when it is rewritten
    rewritten, count = deconv_as_phase_convs(model)

    # then no ConvTranspose (nor BatchNormalization) is left, and the outputs agree to float rounding
    ops = [n.op_type for n in rewritten.graph.node]
    assert count == 1 and "ConvTranspose" not in ops and "BatchNormalization" not in ops
    assert ops.count("Conv") == 4 and "DepthToSpace" in ops
    expected, got = _run(model, x), _run(rewritten, x)
    assert got.shape == expected.shape == (2, 4, 12, 10)
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, float(np.abs(expected).max())))


def test_other_transposed_convolutions_are_left_alone():
    from lineside.export.phase_convs import deconv_as_phase_convs

    model = _tiny_deconv_graph(False, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    rewritten, count = deconv_as_phase_convs(model)
    assert count == 0 and [n.op_type for n in rewritten.graph.node] == ["ConvTranspose"]


@needs_tools
def test_the_int8_vae_has_no_float_transposed_convolution_left(int8_bundle: tuple[Path, dict]):
    import onnx

    out, summary = int8_bundle
    graph = onnx.load(str(out / "vae.int8.onnx")).graph
    assert "ConvTranspose" not in {n.op_type for n in graph.node}
    assert summary["models"]["vae"]["phase_convs"] == 4 and summary["models"]["ssd"]["phase_convs"] == 0


def _borderline_copy(source: Path, int8: Path, target: Path, on_boundary: bool = False) -> str:
    """A copy of `source` deciding by the SSD alone, its threshold between a golden image's float32 and INT8 scores:
    half-way, or (`on_boundary`) at the float32 score itself, so that float32 decides with a score of 0.5."""
    manifest = json.loads((source / "manifest.json").read_text())
    int8_scores = {
        g["file"]["path"]: g["expected_scores"]["ssd"]
        for g in json.loads((int8 / "manifest.json").read_text())["golden"]
    }
    golden = max(manifest["golden"], key=lambda g: abs(g["expected_scores"]["ssd"] - int8_scores[g["file"]["path"]]))
    fp32_score, int8_score = golden["expected_scores"]["ssd"], int8_scores[golden["file"]["path"]]
    assert fp32_score != int8_score
    threshold = (fp32_score + int8_score) / 2
    if on_boundary:  # float32 at 0.5 (defective) or just below it, INT8 across
        threshold = fp32_score if int8_score < fp32_score else fp32_score * (1 + 1e-6)
    # half-way, float32 must lie clear of the boundary (the golden tolerance), or it is no flip at all
    golden_tolerance = golden.get("score_tolerance", 1e-3)
    assert (abs(calibrated_score(fp32_score, threshold) - 0.5) <= golden_tolerance) == on_boundary
    shutil.copytree(source, target)
    manifest["decision"] = {"defective_if_any": ["ssd"], "report_boxes_from": ["ssd"]}
    manifest["models"]["ssd"]["thresholds"]["image"] = threshold
    for g in manifest["golden"]:
        g["expected_is_defective"] = g["expected_scores"]["ssd"] >= threshold
    (target / "manifest.json").write_text(json.dumps(manifest))
    return golden["file"]["path"]


@needs_tools
def test_a_golden_verdict_flipped_by_int8_refuses_the_bundle_unless_allowed(
    int8_bundle: tuple[Path, dict], test_bundle: Path, tmp_path: Path
):
    # given a bundle whose SSD threshold lies between a golden image's float32 and INT8 scores
    flipped = _borderline_copy(test_bundle, int8_bundle[0], tmp_path / "borderline")
    opts = QuantizeOptions(bundle=tmp_path / "borderline", out=tmp_path / "b", images=[test_bundle / "golden"])

    # when it is quantised the same way, it is refused, naming the image
    with pytest.raises(ExportError, match=rf"flip the verdict on golden images .*{re.escape(flipped)}"):
        quantize_bundle(opts)
    assert not (tmp_path / "b").exists()

    # and with the flips allowed it is written, the flip recorded, its golden outputs the INT8 models' own
    opts.allow_golden_flips = True
    summary = quantize_bundle(opts)
    flips = summary["golden_flips"]
    assert flips and any(flipped in f for f in flips)
    engine = InferenceEngine.load(tmp_path / "b")
    assert {s.quantization.golden_flips for s in engine.manifest.models.values()} == {len(flips)}  # type: ignore[union-attr]


@needs_tools
def test_a_golden_verdict_on_the_boundary_is_no_flip(int8_bundle: tuple[Path, dict], test_bundle: Path, tmp_path: Path):
    # given a bundle whose SSD threshold is a golden image's float32 score: float32 decides it with 0.5, INT8
    # just across (numeric noise either way, as the agent's golden check counts it)
    borderline = _borderline_copy(test_bundle, int8_bundle[0], tmp_path / "boundary", on_boundary=True)
    opts = QuantizeOptions(bundle=tmp_path / "boundary", out=tmp_path / "b", images=[test_bundle / "golden"])

    # when it is quantised, flips not allowed
    summary = quantize_bundle(opts)

    # then it is written, with no golden flip, and its golden image records the INT8 verdict, which the agent proves
    assert summary["golden_flips"] == []
    engine = InferenceEngine.load(tmp_path / "b")
    golden = next(g for g in engine.manifest.golden if g.file.path == borderline)
    fp32 = {g["file"]["path"]: g for g in json.loads((tmp_path / "boundary" / "manifest.json").read_text())["golden"]}
    assert golden.expected_is_defective != fp32[borderline]["expected_is_defective"]
