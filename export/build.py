"""`lineside-export build`: training runs -> verified ONNX -> calibrated thresholds -> model bundle.

Everything is written into a temporary folder beside the target and renamed at the very end, so a
failed build never leaves a valid-looking bundle behind.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import shutil
import tarfile
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np

from lineside.agent.bundle.loader import LoadedBundle, sha256_file, verify_files
from lineside.agent.bundle.manifest import (
    BundleManifest,
    ClassifierPost,
    DatasetSummary,
    DecisionRule,
    FileRef,
    GoldenImage,
    ModelSpec,
    Preprocessing,
    SSDPost,
    Thresholds,
    TrainingSummary,
    VAEPost,
)
from lineside.agent.errors import ExportError, ParityError
from lineside.agent.imaging import read_image
from lineside.agent.inference import postprocess
from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.preprocess import BatchBuilder, layout_for, windowed
from lineside.agent.inference.types import ModelOutputs
from lineside.export import metrics
from lineside.export.data.base import Dataset, Sample
from lineside.export.onnx_export import check_parity, export_block
from lineside.export.train import PARAMS_FILE, read_run

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = {
    "classifier": ["probabilities"],
    "vae": ["reconstruction"],
    "ssd": ["class_probs", "box_deltas"],
}
# Max |MXNet - ONNX Runtime| allowed per output. MXNet (MKL-DNN) and ONNX Runtime accumulate float32
# convolutions in different orders; on trained SSD heads with deltas up to ~20 that reaches ~0.03,
# which moves a decoded box by well under a pixel (checked separately: DETECTION_PX).
TOLERANCE = {"probabilities": 1e-3, "reconstruction": 1e-3, "class_probs": 1e-3, "box_deltas": 5e-2}
DETECTION_PX = 1.0  # max corner difference, pixels, between boxes decoded from MXNet and ONNX Runtime heads
PARITY_IMAGES = 4
PARITY_TOP_K = 10  # SSD detections compared per tile


@dataclass
class BuildOptions:
    out: Path
    calib: Dataset
    vae: Path | None = None
    ssd: Path | None = None
    classifier: Path | None = None
    version: str | None = None
    force: bool = False
    dataset_summary: DatasetSummary | None = None


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


def _load_net(kind: str, run: Path, record: dict[str, Any]) -> tuple[mx.gluon.HybridBlock, mx.gluon.HybridBlock, str]:
    """(trained network, its export view, architecture name)."""
    arch = record["architecture"]
    params = str(run / PARAMS_FILE)
    if kind == "ssd":
        from lineside.export.models.ssd import PRESETS, SSDRawHeads, build_ssd

        net = build_ssd(PRESETS[arch["preset"]])
        net.load_parameters(params, ctx=mx.cpu())
        return net, SSDRawHeads(net), f"ssd {arch['preset']}"
    if kind == "classifier":
        from lineside.export.models.classifier import ClassifierExport, build_classifier

        net = build_classifier(arch["backbone"])
        net.load_parameters(params, ctx=mx.cpu())
        return net, ClassifierExport(net), f"classifier {arch['backbone']} tiles, max aggregation"
    from lineside.export.models.vae import ConvVAE, VAEExport

    net = ConvVAE(latent_channels=arch["latent_channels"], width=arch["width"])
    net.load_parameters(params, ctx=mx.cpu())
    return net, VAEExport(net), f"conv-vae width {arch['width']} latent {arch['latent_channels']}"


def _ssd_detection_parity(
    net, view, batches: list[np.ndarray], onnx_path: Path, anchors: np.ndarray, post: SSDPost
) -> tuple[int, int, float]:
    """Our decode + NMS must reproduce GluonCV's own detection head (its top PARITY_TOP_K boxes per tile).

    It runs on MXNet's raw heads: the heads themselves are compared with ONNX Runtime within
    tolerance by check_parity, and feeding identical floats here keeps float noise from reordering
    near-tied scores in NMS. Then the device's view: the same decode on the ONNX Runtime heads must
    give each box within DETECTION_PX pixels. Returns (compared, unmatched, worst px difference of
    the matched boxes). Exact ties may still order NMS differently, so up to 1% may differ.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    compared = unmatched = 0
    worst_px = 0.0
    example = ""
    for batch in batches:
        ids, scores, boxes = (o.asnumpy() for o in net(mx.nd.array(batch)))
        probs, deltas = (o.asnumpy() for o in view(mx.nd.array(batch)))
        ort_probs, ort_deltas = session.run(None, {INPUT_NAME: batch})
        th, tw = batch.shape[2:]
        for i in range(batch.shape[0]):
            ours_b, ours_s = postprocess.decode_ssd_tile(probs[i], deltas[i], anchors, post, (th, tw))
            # What the device computes: the same decode on the ONNX Runtime heads.
            dev_b, dev_s = postprocess.decode_ssd_tile(ort_probs[i], ort_deltas[i], anchors, post, (th, tw))
            for b, sc in zip(ours_b[:PARITY_TOP_K], ours_s[:PARITY_TOP_K], strict=True):
                near = np.abs(dev_s - sc) < 1e-2
                gap = float(np.min(np.abs(dev_b[near] - b).max(axis=1))) if np.any(near) else np.inf
                # Anchors whose scores lie within the heads' tolerance of each other have no defined
                # NMS order: either may survive on either runtime.
                near_tie = int(np.sum(np.abs(probs[i][:, 1] - sc) < TOLERANCE["class_probs"])) > 1
                if gap <= DETECTION_PX:
                    worst_px = max(worst_px, gap)
                elif not near_tie:
                    unmatched += 1
                    example = f"{b.round(1).tolist()} score {sc:.4f} not within {DETECTION_PX} px on ONNX Runtime heads"
            # GluonCV sorts its detections by score: compare its best PARITY_TOP_K valid ones.
            keep = ids[i, :, 0] >= 0
            keep &= np.cumsum(keep) <= PARITY_TOP_K
            ref_b = boxes[i][keep].copy()
            ref_b[:, [0, 2]] = np.clip(ref_b[:, [0, 2]], 0, tw)
            ref_b[:, [1, 3]] = np.clip(ref_b[:, [1, 3]], 0, th)
            ref_s = scores[i][keep][:, 0]
            solid = (ref_b[:, 2] > ref_b[:, 0]) & (ref_b[:, 3] > ref_b[:, 1])
            for rb, rs in zip(ref_b[solid], ref_s[solid], strict=True):
                compared += 1
                same_score = np.abs(ours_s - rs) < 1e-5
                close = np.all(np.abs(ours_b - rb) <= 0.5, axis=1) & same_score
                # Exactly tied scores (flat regions, untrained nets) may keep a different box of the tie.
                tied = int(np.sum(np.abs(probs[i][:, 1] - rs) < 1e-6)) > 1 and np.any(same_score)
                if not (np.any(close) or tied):
                    unmatched += 1
                    example = f"{rb.round(1).tolist()} score {rs:.4f}"
    if compared == 0:
        raise ParityError(f"{onnx_path.name}: GluonCV produced no detection on the calibration tiles to compare")
    if unmatched > 0.01 * max(compared, 1):
        raise ParityError(
            f"{onnx_path.name}: {unmatched} of {compared} GluonCV detections have no counterpart in "
            f"lineside's decode + NMS (e.g. {example})"
        )
    return compared, unmatched, worst_px


def _export_model(kind: str, run: Path, tmp: Path, calib: list[Sample]) -> ModelSpec:
    record = read_run(run, kind)
    prep = Preprocessing.model_validate(record["preprocessing"])
    net, view, arch = _load_net(kind, run, record)
    th, tw = prep.input_size
    onnx_path = tmp / f"{kind}.onnx"
    input_spec, outputs = export_block(view, (1, prep.channels, th, tw), onnx_path, INPUT_NAME, OUTPUT_NAMES[kind])
    batches = _real_batches(calib, prep)
    parity = check_parity(view, onnx_path, INPUT_NAME, batches, {n: TOLERANCE[n] for n in OUTPUT_NAMES[kind]})
    post: ClassifierPost | VAEPost | SSDPost
    if kind == "ssd":
        from lineside.export.models.ssd import anchors_of

        anchors = anchors_of(net, th, mx.cpu()).asnumpy().astype(np.float32)
        anchor_path = tmp / "ssd_anchors.npy"
        np.save(anchor_path, anchors)
        post = SSDPost(anchors=_file_ref(tmp, anchor_path))
        net.hybridize()
        compared, unmatched, px = _ssd_detection_parity(net, view, batches, onnx_path, anchors, post)
        parity = parity.model_copy(
            update={"detections_compared": compared, "detections_unmatched": unmatched, "detection_max_px_diff": px}
        )
    elif kind == "vae":
        post = VAEPost()
    else:
        post = ClassifierPost()
    return ModelSpec(
        kind=kind,  # type: ignore[arg-type]
        file=_file_ref(tmp, onnx_path),
        architecture=arch,
        input=input_spec,
        outputs=outputs,
        preprocessing=prep,
        postprocessing=post,
        training=TrainingSummary.model_validate(record["training"]),
        parity=parity,
    )


_EMPTY = (np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))


def localiser_evals(
    outputs: list[ModelOutputs], samples: list[Sample], kind: str, th: Thresholds, gate: bool = True
) -> list[metrics.ImageEval]:
    """Per-image records of one localiser used alone.

    With `gate`, an image gets boxes only when the model fires for it (as the agent reports them);
    without, every image gets the model's boxes (calibrating the box threshold on its own). SSD
    boxes are passed with all their scores so AP50 can rank them; figures use `th.ssd_score`.
    """
    out = []
    for o, s in zip(outputs, samples, strict=True):
        gt = np.asarray([(b.x1, b.y1, b.x2, b.y2) for b in s.boxes], np.float32).reshape(-1, 4)
        if kind == "ssd":
            score = float(o.ssd_scores.max()) if o.ssd_scores.size else 0.0
            decision = score >= th.ssd_image
            boxes, scores = (o.ssd_boxes, o.ssd_scores) if decision or not gate else _EMPTY
        else:
            assert o.vae_map is not None and o.vae_score is not None
            score = o.vae_score
            decision = score >= th.vae_image
            boxes, scores = (
                postprocess.vae_boxes(o.vae_map, th.vae_pixel, th.vae_min_area) if decision or not gate else _EMPTY
            )
        out.append(metrics.ImageEval(s.name, gt, boxes, scores, (o.height, o.width), bool(s.label), decision, score))
    return out


def _study_avg_f1(evals: list[metrics.ImageEval], score_threshold: float = 0.0) -> float:
    return metrics.study_table(evals, score_threshold=score_threshold).avg_f1


def calibrate(
    outputs: list[ModelOutputs], samples: list[Sample], kinds: list[str]
) -> tuple[Thresholds, DecisionRule, dict[str, Any]]:
    """Thresholds chosen on the held-out (validation) series, and the best decision rule.

    Image thresholds (classifier, SSD best box, VAE map quantile) maximise image-level F1.
    Localisation thresholds (SSD box score, VAE pixel level and minimum area) maximise the study's
    avg F1 over validation images with defects; false boxes there lower it, and false boxes on
    defect-free images are prevented by the image decision, which gates box reporting.
    """
    labels = np.asarray([bool(s.label) for s in samples])
    figures: dict[str, Any] = {"images": len(samples), "defective": int(labels.sum())}
    th = Thresholds()
    if "classifier" in kinds:
        scores = np.asarray([o.classifier_score for o in outputs], np.float64)
        t, f1 = metrics.best_f1_threshold(scores, labels)
        th = th.model_copy(update={"classifier": float(t)})
        figures["classifier"] = {"threshold": float(t), "image_f1": f1}
    if "ssd" in kinds:
        tops = np.asarray([float(o.ssd_scores.max()) if o.ssd_scores.size else 0.0 for o in outputs])
        t_img, f1_img = metrics.best_f1_threshold(tops, labels)
        evals = localiser_evals(outputs, samples, "ssd", th, gate=False)
        all_scores = np.concatenate([o.ssd_scores for o in outputs] + [np.zeros(1, np.float32)])
        candidates = np.unique(np.quantile(all_scores, np.linspace(0.0, 1.0, 41)))
        best_box = max(((_study_avg_f1(evals, float(c)), float(c)) for c in candidates), key=lambda x: (x[0], x[1]))
        th = th.model_copy(update={"ssd_image": float(max(t_img, 0.02)), "ssd_score": float(max(best_box[1], 0.02))})
        figures["ssd"] = {
            "image_threshold": th.ssd_image,
            "image_f1": f1_img,
            "box_threshold": th.ssd_score,
            "avg_f1_defective_images": best_box[0],
        }
    if "vae" in kinds:
        scores = np.asarray([o.vae_score for o in outputs], np.float64)
        t_img, f1_img = metrics.best_f1_threshold(scores, labels)
        th = th.model_copy(update={"vae_image": float(t_img)})
        maps = np.concatenate([o.vae_map.ravel()[::97] for o in outputs if o.vae_map is not None])
        candidates = np.quantile(maps, [0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9998, 0.9999])
        best = (-1.0, float(candidates[0]), 16)
        for pixel, area in itertools.product(candidates, (4, 16, 36, 64, 100)):
            trial = th.model_copy(update={"vae_pixel": float(pixel), "vae_min_area": int(area)})
            f1 = _study_avg_f1(localiser_evals(outputs, samples, "vae", trial, gate=False))
            # Ties (e.g. all zero on a weak model) go to the most conservative setting: fewest boxes.
            if (f1, pixel, area) > best:
                best = (f1, float(pixel), int(area))
        th = th.model_copy(update={"vae_pixel": best[1], "vae_min_area": best[2]})
        figures["vae"] = {
            "image_threshold": t_img,
            "image_f1": f1_img,
            "pixel_threshold": best[1],
            "min_area": best[2],
            "avg_f1_defective_images": best[0],
        }
    # Decision rule: the subset of models (OR-ed) with the best validation image F1.
    fires = {
        "classifier": lambda o: o.classifier_score >= th.classifier,
        "ssd": lambda o: bool(np.any(o.ssd_scores >= th.ssd_image)),
        "vae": lambda o: o.vae_score >= th.vae_image,
    }
    rules: dict[str, float] = {}
    best_rule, best_f1 = [kinds[0]], -1.0
    for r in range(1, len(kinds) + 1):
        for combo in itertools.combinations(kinds, r):
            decisions = np.asarray([any(fires[k](o) for k in combo) for o in outputs])
            f1 = metrics.image_level(labels, decisions)["f1"]
            rules["+".join(combo)] = f1
            if f1 > best_f1 + 1e-9:
                best_rule, best_f1 = list(combo), f1
    figures["decision_rules_image_f1"] = rules
    figures["decision_rule"] = best_rule
    # Report boxes from the localisers that localise on validation: a model whose boxes match no
    # defect there would only add noise to every defective verdict.
    localisers = {k: figures[k]["avg_f1_defective_images"] for k in ("ssd", "vae") if k in kinds}
    best_loc = max(localisers.values(), default=0.0)
    report = [k for k, f1 in localisers.items() if f1 > 0 and f1 >= 0.5 * best_loc]
    if not report and localisers:
        report = ["ssd"] if "ssd" in localisers else list(localisers)
    figures["report_boxes_from"] = report
    return (
        th,
        DecisionRule(defective_if_any=best_rule, report_boxes_from=report),
        figures,
    )


def _golden(tmp: Path, engine: InferenceEngine, seed: int = 7) -> list[GoldenImage]:
    """A few synthetic radiographs (never GDXray: its terms forbid redistribution) with expected outputs."""
    from lineside.export.synth import generate

    golden_dir = tmp / "golden"
    with tempfile.TemporaryDirectory(prefix="lineside-golden-") as work:
        generate(Path(work), images=3, seed=seed, size=(286, 384), defect_free_share=0.34, images_per_series=3)
        golden_dir.mkdir()
        for png in sorted(Path(work).rglob("*.png")):
            shutil.copy2(png, golden_dir / png.name)
    out = []
    for png in sorted(golden_dir.glob("*.png")):
        prediction = engine.predict(read_image(png))
        out.append(
            GoldenImage(
                file=_file_ref(tmp, png),
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
    runs = {k: v for k, v in (("classifier", opts.classifier), ("vae", opts.vae), ("ssd", opts.ssd)) if v}
    if not runs:
        raise ExportError("build needs at least one of --classifier, --vae, --ssd")
    out = Path(opts.out)
    if out.exists() and not opts.force:
        raise ExportError(f"{out} already exists; pass --force to replace it")
    calib = [s for s in opts.calib.samples if s.annotated]
    if not calib:
        raise ExportError(f"{opts.calib.root}: no annotated calibration image")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        models = {kind: _export_model(kind, Path(run), tmp, calib) for kind, run in runs.items()}
        kinds = list(models)
        draft = BundleManifest(
            bundle_id=str(uuid.uuid4()),
            version=opts.version or datetime.now(UTC).strftime("%Y.%m.%d-%H%M%S"),
            created_at=datetime.now(UTC),
            models=models,
            thresholds=Thresholds(),
            decision=DecisionRule(defective_if_any=kinds, report_boxes_from=[k for k in ("ssd", "vae") if k in kinds]),
            dataset=opts.dataset_summary,
            exporter=_exporter_versions(),
        )
        draft.dump(tmp)
        # Calibrate through the agent's own engine, so thresholds fit what the device computes.
        engine = InferenceEngine(LoadedBundle(tmp, draft), providers=["cpu"])
        outputs = [engine.analyze(s.load()) for s in calib]
        thresholds, rule, figures = calibrate(outputs, calib, kinds)
        manifest = draft.model_copy(update={"thresholds": thresholds, "decision": rule, "calibration": figures})
        engine = InferenceEngine(LoadedBundle(tmp, manifest), providers=["cpu"])
        manifest = manifest.model_copy(update={"golden": _golden(tmp, engine)})
        manifest = BundleManifest.model_validate(manifest.model_dump())  # re-run every validator
        manifest.dump(tmp)
        verify_files(tmp, manifest)
        InferenceEngine(LoadedBundle(tmp, manifest), providers=["cpu"]).check_golden()
        archive_tmp = out.parent / f".{out.name}.tar.gz.tmp"
        with tarfile.open(archive_tmp, "w:gz") as tar:
            tar.add(tmp, arcname=out.name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        os.replace(archive_tmp, out.parent / f"{out.name}.tar.gz")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        (out.parent / f".{out.name}.tar.gz.tmp").unlink(missing_ok=True)
        raise
    logger.info("bundle %s version %s written to %s", manifest.bundle_id, manifest.version, out)
    return out
