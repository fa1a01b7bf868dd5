"""Parity: the ONNX model computes what the trained Gluon model computes, and the check says so only then.

The check is given models that really diverge (perturbed ONNX weights) and must refuse them, naming the
output and the difference; its figures are compared with an independent computation; its tolerances
come from one place, which the docs quote.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from lineside.agent.bundle.manifest import BundleManifest
from lineside.agent.errors import ExportError, ParityError
from lineside.agent.imaging import read_image
from lineside.export.build import INPUT_NAME, BuildOptions, _real_batches, build_bundle, reference_outputs
from lineside.export.data import open_dataset
from lineside.export.models import EXPORT_KINDS
from lineside.export.onnx_export import check_parity, export_block
from lineside.export.train import read_run

pytestmark = pytest.mark.export
mx = pytest.importorskip("mxnet")
REPO = Path(__file__).resolve().parents[2]


def perturb(onnx_path: Path, scale: float = 0.5, seed: int = 0) -> str:
    """Add noise to the largest weight tensor of an ONNX file, in place; returns its name."""
    model = onnx.load(str(onnx_path))
    largest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(largest).copy()
    rng = np.random.default_rng(seed)
    weights += rng.normal(0.0, scale * float(weights.std()) + 1e-3, weights.shape).astype(weights.dtype)
    largest.CopyFrom(numpy_helper.from_array(weights, largest.name))
    onnx.save(model, str(onnx_path))
    return largest.name


@pytest.fixture(scope="module")
def exported_classifier(
    trained_runs: dict[str, Path], synth_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[object, Path, list[np.ndarray], tuple]:
    """(Gluon export view, its ONNX file, real calibration batches, export_block's specs) of the classifier."""
    kind = EXPORT_KINDS["classifier"]
    record = read_run(trained_runs["classifier"], "classifier")
    _, view, _ = kind.load(trained_runs["classifier"], record)
    prep = record.preprocessing
    onnx_path = tmp_path_factory.mktemp("onnx") / "classifier.onnx"
    specs = export_block(view, (1, prep.channels, *prep.input_size), onnx_path, INPUT_NAME, ["probabilities"])
    samples = [s for s in open_dataset(synth_dir).samples if s.annotated]
    return view, onnx_path, _real_batches(samples, prep), specs


def test_the_exported_graph_is_clean_named_and_takes_any_batch(exported_classifier: tuple) -> None:
    # given the exported classifier and what the export says about it
    _, onnx_path, batches, (input_spec, outputs) = exported_classifier
    model = onnx.load(str(onnx_path))

    # then: one input named as the manifest says, outputs named, the batch axis dynamic (-1)
    assert [i.name for i in model.graph.input] == [INPUT_NAME]
    assert [o.name for o in model.graph.output] == ["probabilities"]
    assert input_spec.name == INPUT_NAME and input_spec.shape[0] == -1 and input_spec.shape[1:] == [1, 128, 128]
    assert [(o.name, o.shape) for o in outputs] == [("probabilities", [-1, 2])]
    # no initializer is left that no node reads (ONNX Runtime warns about those), and the checker passes
    used = {name for node in model.graph.node for name in node.input}
    assert all(init.name in used for init in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)
    # and ONNX Runtime runs it on a batch of another size than the export's
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    three = np.concatenate([batches[0][:1]] * 3)
    assert session.run(None, {INPUT_NAME: three})[0].shape == (3, 2)


def test_an_export_naming_the_wrong_number_of_outputs_is_refused(exported_classifier: tuple, tmp_path: Path) -> None:
    # given the classifier view, which has one output
    view, _, batches, _ = exported_classifier

    # when / then
    with pytest.raises(ExportError, match=r"graph has 1 outputs, expected 2"):
        export_block(view, (1, *batches[0].shape[1:]), tmp_path / "c.onnx", INPUT_NAME, ["probabilities", "extra"])


def test_a_difference_exactly_at_the_tolerance_passes_and_just_above_fails(exported_classifier: tuple) -> None:
    # given the faithful export and its measured difference
    view, onnx_path, batches, _ = exported_classifier
    measured = check_parity(view, onnx_path, INPUT_NAME, batches, {"probabilities": 1.0}).max_abs_diff["probabilities"]

    # when / then: the tolerance is inclusive
    assert check_parity(view, onnx_path, INPUT_NAME, batches, {"probabilities": measured}).passed
    with pytest.raises(ParityError, match="probabilities: "):
        check_parity(view, onnx_path, INPUT_NAME, batches, {"probabilities": np.nextafter(measured, -1.0)})


def test_parity_refuses_a_model_whose_weights_diverge_naming_output_and_difference(
    exported_classifier: tuple, tmp_path: Path
) -> None:
    # given the exported classifier with noise added to its largest weight tensor
    view, onnx_path, batches, _ = exported_classifier
    diverged = tmp_path / "classifier.onnx"
    shutil.copy(onnx_path, diverged)
    perturb(diverged)

    # when / then: refused, the message names the output and a difference beyond the tolerance
    with pytest.raises(ParityError, match=r"probabilities: ([0-9.e+-]+) > 0\.001") as caught:
        check_parity(view, diverged, INPUT_NAME, batches, EXPORT_KINDS["classifier"].tolerances)
    found = float(re.search(r"probabilities: ([0-9.e+-]+) >", str(caught.value)).group(1))  # type: ignore[union-attr]
    assert found > 0.001


def test_parity_refuses_non_finite_outputs_even_when_both_runtimes_agree(exported_classifier: tuple) -> None:
    # given tiles that make both runtimes output NaN (a diverged model does the same): every difference is NaN,
    # and NaN passes any `<=` tolerance test unless looked for
    view, onnx_path, batches, _ = exported_classifier
    poisoned = [np.full_like(batches[0], np.nan)]

    # when / then
    with pytest.raises(ParityError, match=r"non-finite values .*'probabilities'"):
        check_parity(view, onnx_path, INPUT_NAME, poisoned, EXPORT_KINDS["classifier"].tolerances)


def test_parity_figures_match_an_independent_comparison(exported_classifier: tuple) -> None:
    # given the faithful export
    view, onnx_path, batches, _ = exported_classifier

    # when the check runs, and the same comparison is made here by hand
    report = check_parity(view, onnx_path, INPUT_NAME, batches, EXPORT_KINDS["classifier"].tolerances)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ours = max(
        float(np.max(np.abs(view(mx.nd.array(b)).asnumpy() - session.run(None, {INPUT_NAME: b})[0]))) for b in batches
    )

    # then it passed on what it really measured: ONNX Runtime against MXNet, not MXNet against itself
    assert report.passed
    assert report.images == sum(b.shape[0] for b in batches)
    assert report.max_abs_diff["probabilities"] == pytest.approx(ours, rel=1e-6, abs=1e-12)
    assert report.tolerance == {"probabilities": 1e-3}


def test_the_build_refuses_a_diverging_export_and_leaves_nothing_behind(
    trained_runs: dict[str, Path], synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # given an exporter whose ONNX file comes out with perturbed weights
    import lineside.export.build as build

    real_export = build.export_block

    def diverging_export(*args: object, **kwargs: object) -> object:
        result = real_export(*args, **kwargs)
        perturb(Path(args[2]))  # type: ignore[arg-type]
        return result

    monkeypatch.setattr(build, "export_block", diverging_export)
    out = tmp_path / "out" / "bundle"

    # when / then
    with pytest.raises(ParityError, match=r"classifier\.onnx: ONNX Runtime differs from MXNet .*probabilities: "):
        build_bundle(
            BuildOptions(out=out, calib=open_dataset(synth_dir), runs={"classifier": trained_runs["classifier"]})
        )
    assert list((tmp_path / "out").iterdir()) == []


def _documented_tolerances() -> dict[tuple[str, str], float]:
    """The parity tolerance table of docs/testing.md: | kind | `output` | tolerance | why |."""
    rows = re.findall(r"^\| (\w+) \| `(\w+)` \| ([0-9.e-]+) \|", (REPO / "docs" / "testing.md").read_text(), re.M)
    return {(kind, output): float(value) for kind, output, value in rows}


def test_every_tolerance_has_one_source_which_the_docs_and_the_bundle_quote(test_bundle: Path) -> None:
    # given the tolerances in the code (one dict per model kind) and in the docs
    code = {(k, o): t for k, kind in EXPORT_KINDS.items() for o, t in kind.tolerances.items()}
    documented = _documented_tolerances()

    # then they are the same numbers, one per graph output of every kind, and the bundle applied them
    assert documented == code
    for handler in EXPORT_KINDS.values():
        assert set(handler.tolerances) == set(handler.device.output_names)
    manifest = BundleManifest.read(test_bundle)
    for kind, spec in manifest.models.items():
        assert spec.parity.tolerance == EXPORT_KINDS[kind].tolerances


def test_golden_expectations_come_from_the_gluon_reference(test_bundle: Path, trained_runs: dict[str, Path]) -> None:
    # given the bundle and the trained Gluon models it was built from
    from lineside.agent.bundle.loader import load_bundle

    bundle = load_bundle(test_bundle)
    views = {}
    for kind, run in trained_runs.items():
        _, view, _ = EXPORT_KINDS[kind].load(run, read_run(run, kind))
        views[kind] = view

    # when each golden image is run through MXNet here
    for golden in bundle.manifest.golden:
        reference = reference_outputs(views, bundle, read_image(test_bundle / golden.file.path))

        # then the recorded expectations are MXNet's scores (ONNX Runtime is what the device checks)
        for kind, expected in golden.expected_scores.items():
            assert reference.models[kind].score == pytest.approx(expected, rel=1e-6, abs=1e-9), kind
