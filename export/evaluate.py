"""`lineside-export evaluate`: a bundle through the agent's inference engine on test images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lineside.agent.errors import DatasetError
from lineside.agent.inference.engine import InferenceEngine
from lineside.export import metrics
from lineside.export.data.base import Dataset
from lineside.export.models import EXPORT_KINDS
from lineside.export.models.base import ground_truth

logger = logging.getLogger(__name__)


def evaluate_bundle(bundle: Path, test: Dataset, providers: list[str] | None = None) -> dict[str, Any]:
    """Per method (classifier, vae, ssd, combined): the study table, box P/R/F1, AP50, image level."""
    engine = InferenceEngine.load(bundle, providers=providers or ["cpu"])
    try:
        return _evaluate(engine, test)
    finally:
        engine.close()


def _evaluate(engine: InferenceEngine, test: Dataset) -> dict[str, Any]:
    samples = [s for s in test.samples if s.annotated]
    if not samples:
        raise DatasetError(f"{test.root}: no annotated test image (unannotated series never count as normal)")
    outputs, predictions = [], []
    for sample in tqdm(samples, desc="evaluating", unit="img", disable=None):
        out = engine.analyze(sample.load())
        outputs.append(out)
        predictions.append(engine.decide(out))
    labels = np.asarray([bool(s.label) for s in samples])
    thresholds = engine.thresholds()
    results: dict[str, Any] = {
        kind: EXPORT_KINDS[kind].evaluate(outputs, samples, thresholds[kind]) for kind in engine.manifest.models
    }
    combined = []
    for s, o, p in zip(samples, outputs, predictions, strict=True):
        gt = ground_truth(s)
        boxes = np.asarray([(d.x1, d.y1, d.x2, d.y2) for d in p.boxes], np.float32).reshape(-1, 4)
        scores = np.asarray([d.score for d in p.boxes], np.float32)
        combined.append(
            metrics.ImageEval(s.name, gt, boxes, scores, (o.height, o.width), bool(s.label), p.is_defective, p.score)
        )
    results["combined"] = metrics.evaluate_method(combined)
    fused = np.asarray([p.score for p in predictions], np.float64)
    decisions = np.asarray([p.is_defective for p in predictions])
    normal = ~labels
    false_boxes = sum(len(p.boxes) for p, is_normal in zip(predictions, normal, strict=True) if is_normal)
    operating = {
        "recall": metrics.image_level(labels, decisions)["recall"],
        "false_alarm_rate": float(np.count_nonzero(decisions & normal) / max(int(normal.sum()), 1)),
        "false_boxes_per_normal_image": false_boxes / max(int(normal.sum()), 1),
        "box_recall_iou25": results["combined"]["box"]["iou25"]["recall"],
        "flag_everything_image_f1": metrics.image_level(labels, np.ones_like(labels))["f1"],
        "validation": engine.manifest.calibration.get("operating_point"),
    }
    auroc = {
        "decision_score": metrics.auroc(fused, labels),
        **{kind: metrics.auroc([o.models[kind].score for o in outputs], labels) for kind in engine.manifest.models},
    }
    groups = np.asarray([s.group for s in samples])
    per_group = {}
    for group in sorted(set(groups.tolist())):
        at = groups == group
        g_labels, g_decisions = labels[at], decisions[at]
        g_evals = [e for e, here in zip(combined, at, strict=True) if here]
        per_group[group] = {
            "images": int(at.sum()),
            "defective": int(g_labels.sum()),
            "recall": float(np.mean(g_decisions[g_labels])) if g_labels.any() else None,
            "false_alarm_rate": float(np.mean(g_decisions[~g_labels])) if (~g_labels).any() else None,
            "auroc": metrics.auroc(fused[at], g_labels),
            "avg_f1": metrics.study_table(g_evals).avg_f1 if g_labels.any() else None,
        }
    ms = [o.timings_ms.get("models_total", 0.0) for o in outputs]
    return {
        "bundle_id": engine.manifest.bundle_id,
        "bundle_version": engine.manifest.version,
        "providers": engine.providers_in_use,
        "test_groups": test.groups(),
        "images": len(samples),
        "defective_images": int(labels.sum()),
        "thresholds": {kind: t.model_dump() for kind, t in thresholds.items()},
        "decision_rule": engine.manifest.decision.defective_if_any,
        "auroc": auroc,
        "operating_point": operating,
        "per_group": per_group,  # the decision per test series/part: where a figure comes from
        "latency_ms": {"median": float(np.median(ms)), "p99": float(np.percentile(ms, 99))},
        "methods": results,
    }
