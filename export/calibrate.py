"""Calibration policy: thresholds per model kind, then the decision rule and its operating point, all on
validation series.

Each kind calibrates its own localisation thresholds (`ExportKind.calibrate`: box score, pixel level).
The image decision is then set by cost, not by F1: a plant states the recall it needs (default 0.98)
and gets the lowest false-alarm rate that reaches it on validation. Maximising F1 on sets that are
mostly defective makes "flag everything" optimal; the F1-optimal point is kept only as a reported figure.

The decision rule fuses the models: an image is defective when any model of the rule fires, each at the
threshold that gives the same false-alarm rate on normal validation images (so a model's evidence counts
by how rare it is on good parts, whatever its score scale). Every subset of the models is tried; the one
with the fewest false alarms at the target recall wins (ties: higher recall, then fewer models).
Boxes are reported from the localisers whose boxes matched defects on validation. The build and the
evaluation both use this module; neither imports the other.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lineside.agent.bundle.manifest import DecisionRule
from lineside.agent.inference.types import ModelOutputs
from lineside.agent.models import KindThresholds
from lineside.export import metrics
from lineside.export.data.base import Sample
from lineside.export.models import EXPORT_KINDS

logger = logging.getLogger(__name__)

DEFAULT_TARGET_RECALL = 0.98
# Below these counts the operating point is a rough guess; the figures say so (`warnings`).
MIN_NORMAL_IMAGES = 10
MIN_DEFECTIVE_IMAGES = 10
# Series (parts) differ in exposure and part type: an operating point set on a few transfers badly
# (GDXray: recall 1.0 on 4 wheel series gave 0.90 on unseen series, docs/evaluation.md).
MIN_CALIBRATION_GROUPS = 5
# Above this share of normal validation images flagged, the decision hardly tells good from bad parts.
MAX_FALSE_ALARM_RATE = 0.5


@dataclass(frozen=True)
class OperatingPoint:
    """Where the image decision sits on validation: which models, their thresholds, what it costs."""

    rule: list[str]
    thresholds: dict[str, float]
    target_recall: float
    recall: float
    false_alarm_rate: float  # share of normal validation images flagged
    precision: float
    f1: float


def _margin_below(value: float, scores: np.ndarray) -> float:
    """Midway between `value` and the next lower score (validation decisions unchanged, widest margin)."""
    lower = scores[scores < value]
    return float((value + lower.max()) / 2.0) if lower.size else float(value)


def operating_point(
    scores: Mapping[str, np.ndarray], labels: np.ndarray, rule: Sequence[str], target_recall: float
) -> OperatingPoint:
    """The lowest false-alarm rate at which OR-ing `rule`'s models reaches `target_recall` on these images.

    Each model's threshold is the loosest one whose own false-alarm rate stays within a common level;
    the level is raised one step at a time (false alarms and recall only grow) until the recall is met.
    """
    y = np.asarray(labels, dtype=bool)
    normal = ~y
    levels = {k: metrics.false_alarm_levels(scores[k][normal], scores[k]) for k in rule}
    fused = np.min([levels[k] for k in rule], axis=0)
    for level in np.unique(fused):
        thresholds = {k: float(scores[k][levels[k] <= level].min()) for k in rule if np.any(levels[k] <= level)}
        decisions = np.any([scores[k] >= t for k, t in thresholds.items()], axis=0)
        fig = metrics.image_level(y, decisions)
        if fig["recall"] >= target_recall - 1e-12:
            break
    flagged_normal = int(np.count_nonzero(decisions & normal))
    return OperatingPoint(
        rule=[k for k in rule if k in thresholds],
        thresholds={k: _margin_below(t, scores[k]) for k, t in thresholds.items()},
        target_recall=target_recall,
        recall=float(fig["recall"]),
        false_alarm_rate=flagged_normal / max(int(normal.sum()), 1),
        precision=float(fig["precision"]),
        f1=float(fig["f1"]),
    )


def _f1_optimal(
    fires: Mapping[str, np.ndarray], labels: np.ndarray, kinds: Sequence[str]
) -> tuple[list[str], dict[str, float]]:
    """The OR-rule with the best validation image F1 at each model's own F1 threshold (reported only)."""
    rules: dict[str, float] = {}
    best_rule, best_f1 = [kinds[0]], -1.0
    for r in range(1, len(kinds) + 1):
        for combo in itertools.combinations(kinds, r):
            f1 = metrics.image_level(labels, np.any([fires[k] for k in combo], axis=0))["f1"]
            rules["+".join(combo)] = f1
            if f1 > best_f1 + 1e-9:  # ties keep the smaller rule
                best_rule, best_f1 = list(combo), f1
    return best_rule, rules


def calibration_warnings(labels: np.ndarray, groups: Sequence[str], point: OperatingPoint) -> list[str]:
    """What makes this operating point a rough guess or a useless one, in words for the report."""
    n_def, n_norm = int(labels.sum()), int((~labels).sum())
    warnings: list[str] = []
    if n_norm < MIN_NORMAL_IMAGES:
        warnings.append(
            f"only {n_norm} normal validation image(s): the false-alarm rate of the operating point is a rough "
            f"guess (want >= {MIN_NORMAL_IMAGES})" + ("; with none, every image is flagged" if n_norm == 0 else "")
        )
    if n_def < MIN_DEFECTIVE_IMAGES:
        warnings.append(
            f"only {n_def} defective validation image(s): the recall of the operating point is a rough guess "
            f"(want >= {MIN_DEFECTIVE_IMAGES})"
        )
    series = sorted(set(groups))
    if len(series) < MIN_CALIBRATION_GROUPS:
        warnings.append(
            f"the operating point was set on {len(series)} series/part(s) ({', '.join(series)}); it may not "
            f"transfer to parts or exposures unlike them (want >= {MIN_CALIBRATION_GROUPS}, covering every part "
            "type the line runs)"
        )
    if n_norm and point.false_alarm_rate > MAX_FALSE_ALARM_RATE:
        warnings.append(
            f"at recall {point.recall:.2f} the decision flags {point.false_alarm_rate:.0%} of normal validation "
            f"images: the models hardly separate good from defective parts on these series (more than "
            f"{MAX_FALSE_ALARM_RATE:.0%}); train longer, add data, or lower --target-recall"
        )
    return warnings


def calibrate(
    outputs: Sequence[ModelOutputs],
    samples: Sequence[Sample],
    kinds: Sequence[str],
    target_recall: float = DEFAULT_TARGET_RECALL,
) -> tuple[dict[str, KindThresholds], DecisionRule, dict[str, Any]]:
    """(thresholds per kind, decision rule, validation figures) for the bundle's models."""
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    labels = np.asarray([bool(s.label) for s in samples])
    n_def = int(labels.sum())
    figures: dict[str, Any] = {"images": len(samples), "defective": n_def}
    thresholds: dict[str, KindThresholds] = {}
    for kind in kinds:
        thresholds[kind], figures[kind] = EXPORT_KINDS[kind].calibrate(outputs, samples)

    scores = {k: np.asarray([o.models[k].score for o in outputs], np.float64) for k in kinds}
    figures["auroc"] = {k: metrics.auroc(scores[k], labels) for k in kinds}
    fires = {k: scores[k] >= thresholds[k].image for k in kinds}
    f1_rule, rules = _f1_optimal(fires, labels, kinds)
    figures["decision_rules_image_f1"] = rules
    figures["f1_optimal"] = {
        "rule": f1_rule,
        "thresholds": {k: float(thresholds[k].image) for k in f1_rule},
        **metrics.image_level(labels, np.any([fires[k] for k in f1_rule], axis=0)),
    }

    best: OperatingPoint | None = None
    for r in range(1, len(kinds) + 1):
        for combo in itertools.combinations(kinds, r):
            point = operating_point(scores, labels, combo, target_recall)
            if best is None or (point.false_alarm_rate, -point.recall) < (best.false_alarm_rate, -best.recall):
                best = point
    assert best is not None  # kinds is never empty
    for kind, value in best.thresholds.items():
        thresholds[kind] = thresholds[kind].model_copy(update={"image": value})
    fused = np.min(
        [metrics.false_alarm_levels(scores[k][~labels], scores[k]) for k in best.rule], axis=0
    )  # how rare each image's strongest evidence is on normal parts
    figures["operating_point"] = {**asdict(best), "auroc": metrics.auroc(-fused, labels)}
    figures["decision_rule"] = best.rule
    # A localiser whose boxes match no defect on validation would only add noise to every defective verdict.
    localisers = {k: figures[k]["avg_f1_defective_images"] for k in kinds if EXPORT_KINDS[k].device.localiser}
    best_loc = max(localisers.values(), default=0.0)
    report = [k for k, f1 in localisers.items() if f1 > 0 and f1 >= 0.5 * best_loc]
    if not report:
        report = list(localisers)  # none localises yet: keep them all rather than hide every box
    figures["report_boxes_from"] = report
    warnings = calibration_warnings(labels, [s.group for s in samples], best)
    figures["warnings"] = warnings
    for warning in warnings:
        logger.warning("calibration: %s", warning)
    logger.info(
        "operating point: %s at recall %.3f (target %.2f), false alarms %.3f of normal images, F1 %.3f",
        "+".join(best.rule),
        best.recall,
        target_recall,
        best.false_alarm_rate,
        best.f1,
    )
    return thresholds, DecisionRule(defective_if_any=best.rule, report_boxes_from=report), figures
