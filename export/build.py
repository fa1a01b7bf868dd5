"""`lineside-export build`: training runs -> verified ONNX -> calibrated thresholds -> model bundle.

Everything is written into a temporary folder beside the target and renamed at the very end, so a
failed build never leaves a valid-looking bundle behind.
"""

from __future__ import annotations

import logging
import platform
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np

from lineside.agent.bundle.loader import LoadedBundle, sha256_file, verify_files
from lineside.agent.bundle.manifest import (
    BundleManifest,
    DatasetSummary,
    DecisionRule,
    FileRef,
    GoldenImage,
    ModelSpec,
    Preprocessing,
)
from lineside.agent.errors import ExportError
from lineside.agent.imaging import read_image
from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.preprocess import BatchBuilder, layout_for, windowed
from lineside.agent.inference.types import ModelOutputs
from lineside.agent.models import MODEL_KINDS
from lineside.export.calibrate import DEFAULT_TARGET_RECALL, calibrate
from lineside.export.data.base import Dataset, Sample
from lineside.export.models import EXPORT_KINDS
from lineside.export.onnx_export import check_parity, export_block
from lineside.export.pack import pack_bundle
from lineside.export.train import read_run

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
PARITY_IMAGES = 4


@dataclass
class BuildOptions:
    out: Path
    calib: Dataset
    runs: dict[str, Path | None]  # model kind -> its training run folder
    version: str | None = None
    force: bool = False
    dataset_summary: DatasetSummary | None = None
    target_recall: float = DEFAULT_TARGET_RECALL  # the image decision's operating point (export.calibrate)
    post_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> post-processing fields


def dataset_summary(dataset: Dataset, train: Dataset, val: Dataset, test: Dataset) -> DatasetSummary:
    """What the bundle was trained, calibrated and tested on (recorded in the manifest)."""

    def counts(d: Dataset) -> tuple[int, int]:
        return len(d.samples), sum(1 for s in d.samples if s.annotated and s.label)

    parts = {"train": counts(train), "val": counts(val), "test": counts(test)}
    return DatasetSummary(
        kind=dataset.name,
        root=str(dataset.root),
        train_groups=train.groups(),
        val_groups=val.groups(),
        test_groups=test.groups(),
        images={k: v[0] for k, v in parts.items()},
        defective_images={k: v[1] for k, v in parts.items()},
    )


def _file_ref(root: Path, path: Path) -> FileRef:
    return FileRef(path=path.relative_to(root).as_posix(), sha256=sha256_file(path))


def _real_batches(samples: list[Sample], prep: Preprocessing) -> list[np.ndarray]:
    """Model-input batches cut from real calibration images, through the agent's preprocessing."""
    builder = BatchBuilder(prep)
    out = []
    for sample in samples[:PARITY_IMAGES]:
        image = sample.load()
        unit = windowed(image, prep)
        out.append(builder.build(unit, layout_for(image.shape, prep)).copy())
    return out


def _export_model(
    kind: str, run: Path, tmp: Path, calib: list[Sample], post_overrides: dict[str, Any] | None = None
) -> tuple[ModelSpec, mx.gluon.HybridBlock]:
    """Export one run to ONNX, prove parity on real calibration tiles, and describe it for the manifest.

    Its thresholds are placeholders until `calibrate` has run on the exported model."""
    handler = EXPORT_KINDS[kind]
    record = read_run(run, kind)
    prep = record.preprocessing
    net, view, arch = handler.load(run, record)
    th, tw = prep.input_size
    onnx_path = tmp / f"{kind}.onnx"
    names = list(handler.device.output_names)
    input_spec, outputs = export_block(view, (1, prep.channels, th, tw), onnx_path, INPUT_NAME, names)
    batches = _real_batches(calib, prep)
    parity = check_parity(view, onnx_path, INPUT_NAME, batches, {n: handler.tolerances[n] for n in names})
    post = handler.post(net, record, tmp)
    if post_overrides:
        try:
            post = type(post).model_validate({**post.model_dump(), **post_overrides})
        except ValueError as err:
            raise ExportError(f"--post for {kind}: {err}") from err
    extra = handler.detection_parity(net, view, batches, onnx_path, post)
    if extra:
        parity = parity.model_copy(update=extra)
    spec = ModelSpec(
        kind=kind,  # type: ignore[arg-type]
        file=_file_ref(tmp, onnx_path),
        architecture=arch,
        input=input_spec,
        outputs=outputs,
        preprocessing=prep,
        postprocessing=post,
        thresholds=handler.device.thresholds_class(),
        training=record.training,
        parity=parity,
    )
    return spec, view


def reference_outputs(views: dict[str, mx.gluon.HybridBlock], bundle: LoadedBundle, image: np.ndarray) -> ModelOutputs:
    """What the trained Gluon models (the reference, not ONNX Runtime) say about an image, post-processed
    exactly as the device does it."""
    h, w = image.shape
    models = {}
    for kind, view in views.items():
        spec = bundle.manifest.models[kind]
        prep = spec.preprocessing
        unit = windowed(image, prep)
        layout = layout_for(image.shape, prep)
        outputs = view(mx.nd.array(BatchBuilder(prep).build(unit, layout)))
        outputs = [outputs] if isinstance(outputs, mx.nd.NDArray) else list(outputs)
        tensors = {o.name: a.asnumpy() for o, a in zip(spec.outputs, outputs, strict=True)}
        models[kind] = MODEL_KINDS[kind](spec, bundle).outputs(tensors, unit, layout)
    return ModelOutputs(height=h, width=w, models=models)


GOLDEN_CANDIDATES = 8
GOLDEN_PER_VERDICT = 2


def _golden(
    tmp: Path, engine: InferenceEngine, views: dict[str, mx.gluon.HybridBlock], seed: int = 7
) -> list[GoldenImage]:
    """Synthetic radiographs (never GDXray: its terms forbid redistribution) with the outputs the trained
    Gluon models give for them, so the device proves its ONNX models against the reference.

    Up to GOLDEN_PER_VERDICT images of each verdict are kept (normal ones first), so a bundle checks a
    normal verdict too whenever its models call any candidate normal.
    """
    from lineside.export.synth import generate

    golden_dir = tmp / "golden"
    golden_dir.mkdir()
    found: dict[bool, list[tuple[float, Path, ModelOutputs]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="lineside-golden-") as work:
        generate(Path(work), images=GOLDEN_CANDIDATES, seed=seed, size=(286, 384), defect_free_share=0.5,
                 images_per_series=GOLDEN_CANDIDATES)  # fmt: skip
        for png in sorted(Path(work).rglob("*.png")):
            reference = reference_outputs(views, engine.bundle, read_image(png))
            verdict = engine.decide(reference)
            target = golden_dir / png.name
            shutil.copy2(png, target)
            found[verdict.is_defective].append((abs(verdict.score - 0.5), target, reference))
        # The clearest verdicts of each kind; the others are not shipped.
        picked: dict[bool, list[tuple[Path, ModelOutputs]]] = {}
        for verdict, items in found.items():
            items.sort(key=lambda item: -item[0])
            picked[verdict] = [(path, ref) for _, path, ref in items[:GOLDEN_PER_VERDICT]]
            for _, path, _ in items[GOLDEN_PER_VERDICT:]:
                path.unlink()
    if not picked[False]:
        logger.warning("golden images: the models call none of %d synthetic candidates normal", GOLDEN_CANDIDATES)
    out = []
    for path, reference in [*picked[False], *picked[True]]:
        prediction = engine.decide(reference)
        out.append(
            GoldenImage(
                file=_file_ref(tmp, path),
                expected_scores=prediction.model_scores,
                expected_is_defective=prediction.is_defective,
                expected_boxes=len(prediction.boxes),
            )
        )
    return out


def _exporter_versions() -> dict[str, str]:
    import gluoncv
    import onnx
    import onnxruntime

    from lineside.agent import __version__

    return {
        "lineside": __version__,
        "mxnet": mx.__version__,
        "gluoncv": gluoncv.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def build_bundle(opts: BuildOptions) -> Path:
    """Export, verify, calibrate and pack. Returns the bundle folder; `<out>.tar.gz` is written too."""
    runs = {kind: Path(run) for kind, run in opts.runs.items() if run}
    unknown = sorted(set(runs) - set(EXPORT_KINDS))
    if unknown:
        raise ExportError(f"unknown model kind(s) {unknown}; expected some of {sorted(EXPORT_KINDS)}")
    if not runs:
        raise ExportError("build needs at least one run: " + ", ".join(f"--{k}" for k in EXPORT_KINDS))
    stray = sorted(set(opts.post_overrides) - set(runs))
    if stray:
        raise ExportError(f"--post names model kind(s) {stray} that this build has no run for")
    out = Path(opts.out)
    if out.exists() and not opts.force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    calib = [s for s in opts.calib.samples if s.annotated]
    if not calib:
        raise ExportError(f"{opts.calib.root}: no annotated calibration image")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        exported = {
            kind: _export_model(kind, run, tmp, calib, opts.post_overrides.get(kind)) for kind, run in runs.items()
        }
        models = {kind: spec for kind, (spec, _) in exported.items()}
        views = {kind: view for kind, (_, view) in exported.items()}
        kinds = list(models)
        draft = BundleManifest(
            bundle_id=str(uuid.uuid4()),
            version=opts.version or datetime.now(UTC).strftime("%Y.%m.%d-%H%M%S"),
            created_at=datetime.now(UTC),
            models=models,
            decision=DecisionRule(defective_if_any=kinds),
            dataset=opts.dataset_summary,
            exporter=_exporter_versions(),
        )
        draft.dump(tmp)
        # Calibrate through the agent's own engine, so thresholds fit what the device computes.
        engine = InferenceEngine(LoadedBundle(tmp, draft), providers=["cpu"])
        outputs = [engine.analyze(s.load()) for s in calib]
        thresholds, rule, figures = calibrate(outputs, calib, kinds, opts.target_recall)
        calibrated = {k: spec.model_copy(update={"thresholds": thresholds[k]}) for k, spec in models.items()}
        manifest = draft.model_copy(update={"models": calibrated, "decision": rule, "calibration": figures})
        engine = InferenceEngine(LoadedBundle(tmp, manifest), providers=["cpu"])
        manifest = manifest.model_copy(update={"golden": _golden(tmp, engine, views)})
        manifest = BundleManifest.model_validate(manifest.model_dump())  # re-run every validator
        manifest.dump(tmp)
        verify_files(tmp, manifest)
        InferenceEngine(LoadedBundle(tmp, manifest), providers=["cpu"]).check_golden()
        pack_bundle(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("bundle %s version %s written to %s", manifest.bundle_id, manifest.version, out)
    return out
