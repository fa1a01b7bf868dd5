"""Calibration policy: thresholds per model kind, then the decision rule, all on validation series.

Each kind calibrates its own thresholds (`ExportKind.calibrate`). The decision rule is then the subset
of models (OR-ed) with the best validation image F1, and boxes are reported from the localisers whose
boxes matched defects on validation. The build and the evaluation both use this module; neither
imports the other.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from lineside.agent.bundle.manifest import DecisionRule
from lineside.agent.inference.types import ModelOutputs
from lineside.agent.models import KindThresholds
from lineside.export import metrics
from lineside.export.data.base import Sample
from lineside.export.models import EXPORT_KINDS


def calibrate(
    outputs: Sequence[ModelOutputs], samples: Sequence[Sample], kinds: Sequence[str]
) -> tuple[dict[str, KindThresholds], DecisionRule, dict[str, Any]]:
    """(thresholds per kind, decision rule, validation figures) for the bundle's models."""
    labels = np.asarray([bool(s.label) for s in samples])
    figures: dict[str, Any] = {"images": len(samples), "defective": int(labels.sum())}
    thresholds: dict[str, KindThresholds] = {}
    for kind in kinds:
        thresholds[kind], figures[kind] = EXPORT_KINDS[kind].calibrate(outputs, samples)

    fires = {k: np.asarray([o.models[k].score >= thresholds[k].image for o in outputs]) for k in kinds}
    rules: dict[str, float] = {}
    best_rule, best_f1 = [kinds[0]], -1.0
    for r in range(1, len(kinds) + 1):
        for combo in itertools.combinations(kinds, r):
            decisions = np.any([fires[k] for k in combo], axis=0)
            f1 = metrics.image_level(labels, decisions)["f1"]
            rules["+".join(combo)] = f1
            if f1 > best_f1 + 1e-9:  # ties keep the smaller rule
                best_rule, best_f1 = list(combo), f1
    figures["decision_rules_image_f1"] = rules
    figures["decision_rule"] = best_rule
    # A localiser whose boxes match no defect on validation would only add noise to every defective verdict.
    localisers = {k: figures[k]["avg_f1_defective_images"] for k in kinds if EXPORT_KINDS[k].device.localiser}
    best_loc = max(localisers.values(), default=0.0)
    report = [k for k, f1 in localisers.items() if f1 > 0 and f1 >= 0.5 * best_loc]
    if not report:
        report = list(localisers)  # none localises yet: keep them all rather than hide every box
    figures["report_boxes_from"] = report
    return thresholds, DecisionRule(defective_if_any=best_rule, report_boxes_from=report), figures
