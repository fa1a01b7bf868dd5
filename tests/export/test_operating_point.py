"""The image decision's operating point: AUROC, false-alarm levels, and the recall-targeted rule.

Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import numpy as np
import pytest

from lineside.export.calibrate import OperatingPoint, calibration_warnings, operating_point
from lineside.export.metrics import auroc, false_alarm_levels


def test_auroc_counts_pairs_with_ties_as_half() -> None:
    # defective 0.9, 0.5; normal 0.5, 0.1. Pairs: (0.9>0.5)=1, (0.9>0.1)=1, (0.5=0.5)=0.5, (0.5>0.1)=1 -> 3.5/4
    assert auroc([0.9, 0.5, 0.5, 0.1], [True, True, False, False]) == pytest.approx(0.875)


def test_auroc_of_a_perfect_and_an_inverted_ranking() -> None:
    assert auroc([0.2, 0.8], [False, True]) == 1.0
    assert auroc([0.8, 0.2], [False, True]) == 0.0


def test_auroc_is_undefined_without_both_classes() -> None:
    assert auroc([0.1, 0.9], [True, True]) is None
    assert auroc([0.1, 0.9], [False, False]) is None


def test_false_alarm_levels_are_the_share_of_normals_at_or_above() -> None:
    normals = np.array([0.1, 0.2, 0.3, 0.4])
    # 0.35: one normal (0.4) at or above -> 0.25; 0.2: 0.2, 0.3, 0.4 -> 0.75; 0.05: all -> 1; 0.5: none -> 0
    assert false_alarm_levels(normals, np.array([0.35, 0.2, 0.05, 0.5])).tolist() == [0.25, 0.75, 1.0, 0.0]
    assert false_alarm_levels(np.array([]), np.array([0.3])).tolist() == [0.0]


def test_operating_point_takes_the_fewest_false_alarms_that_reach_the_recall() -> None:
    # 10 defective: 0.45 and 0.65..1.0; 10 normal at 0.0..0.9 (step 0.1). Recall 0.9 needs the 9 highest:
    # a threshold in (0.6, 0.65] flags normals 0.7, 0.8, 0.9 = 3/10 false alarms.
    defective = np.array([0.45, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.0])
    normal = np.linspace(0.0, 0.9, 10)
    scores = {"m": np.concatenate([defective, normal])}
    labels = np.array([True] * 10 + [False] * 10)

    point = operating_point(scores, labels, ["m"], target_recall=0.9)

    assert point.recall == pytest.approx(0.9)
    assert point.false_alarm_rate == pytest.approx(0.3)
    # placed midway below the lowest flagged score (0.65) and the next lower one (normal 0.6): same decisions
    assert point.thresholds["m"] == pytest.approx(0.625)
    # full recall costs more: catching 0.45 flags normals 0.5-0.9
    full = operating_point(scores, labels, ["m"], target_recall=1.0)
    assert full.recall == 1.0
    assert full.false_alarm_rate == pytest.approx(0.5)


def test_fusing_two_models_catches_what_each_misses_alone() -> None:
    # a sees defects 0-1, b sees defects 2-3; on normals both are low. Alone each reaches recall 0.5 only
    # without false alarms; OR-ed at equal false-alarm levels they reach recall 1 with none.
    a = np.array([0.9, 0.8, 0.1, 0.1, 0.2, 0.1, 0.3])
    b = np.array([0.1, 0.1, 0.9, 0.7, 0.1, 0.2, 0.1])
    labels = np.array([True, True, True, True, False, False, False])

    alone = operating_point({"a": a}, labels, ["a"], target_recall=1.0)
    fused = operating_point({"a": a, "b": b}, labels, ["a", "b"], target_recall=1.0)

    assert alone.false_alarm_rate == 1.0  # catching defects 2-3 on a's score flags every normal
    assert fused.recall == 1.0
    assert fused.false_alarm_rate == 0.0
    assert fused.rule == ["a", "b"]


def test_without_normal_images_everything_is_flagged() -> None:
    point = operating_point({"m": np.array([0.2, 0.9])}, np.array([True, True]), ["m"], target_recall=0.98)
    assert point.recall == 1.0
    assert point.thresholds["m"] <= 0.2


def _point(false_alarm_rate: float, recall: float = 1.0) -> OperatingPoint:
    return OperatingPoint(["ssd"], {"ssd": 0.5}, 0.98, recall, false_alarm_rate, 0.5, 0.6)


def test_a_well_covered_calibration_set_gets_no_warning() -> None:
    labels = np.array([True] * 12 + [False] * 30)
    groups = [f"S{i % 6}" for i in range(labels.size)]
    assert calibration_warnings(labels, groups, _point(0.2)) == []


def test_few_calibration_series_are_named_in_the_warning() -> None:
    # the GDXray default split: 4 wheel series set the operating point for every part type
    labels = np.array([True] * 45 + [False] * 103)
    groups = ["C0010", "C0015", "C0026", "C0029"] * 37
    (warning,) = calibration_warnings(labels, groups, _point(0.3))
    assert "4 series/part(s) (C0010, C0015, C0026, C0029)" in warning and "want >= 5" in warning


def test_an_operating_point_that_flags_most_good_parts_is_called_out() -> None:
    labels = np.array([True] * 45 + [False] * 103)
    groups = [f"S{i % 8}" for i in range(labels.size)]
    (warning,) = calibration_warnings(labels, groups, _point(0.864))
    assert "flags 86% of normal validation images" in warning and "--target-recall" in warning
    # exactly at the limit is still a decision that separates something
    assert calibration_warnings(labels, groups, _point(0.5)) == []


def test_thin_validation_sets_warn_about_both_counts() -> None:
    labels = np.array([True] * 3 + [False] * 4)
    groups = [f"S{i}" for i in range(labels.size)]
    warnings = calibration_warnings(labels, groups, _point(0.0))
    assert len(warnings) == 2
    assert "only 4 normal validation image(s)" in warnings[0] and "only 3 defective" in warnings[1]
