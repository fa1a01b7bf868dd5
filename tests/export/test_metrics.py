"""Tests for export.metrics: every expected value below is worked out by hand in the comments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lineside.export.metrics import (
    ImageEval,
    average_precision,
    best_box_threshold,
    best_f1_threshold,
    box_iou,
    box_prf,
    evaluate_method,
    format_table,
    image_f1,
    image_level,
    match_greedy,
    study_table,
    union_iou,
)

SHAPE = (64, 64)
NO_BOXES = np.zeros((0, 4))


def boxes(*rows: tuple[float, float, float, float]) -> np.ndarray:
    return np.array(rows, dtype=np.float64).reshape(-1, 4)


def image(
    name: str,
    gt: np.ndarray,
    pred: np.ndarray,
    scores: list[float],
    decision: bool | None = None,
    score: float = 0.0,
) -> ImageEval:
    label = len(gt) > 0
    return ImageEval(
        name=name,
        gt_boxes=gt,
        pred_boxes=pred,
        pred_scores=np.array(scores, dtype=np.float64),
        shape=SHAPE,
        label=label,
        decision=label if decision is None else decision,
        score=score,
    )


# ---- box_iou / union_iou -------------------------------------------------------------------------


def test_perfect_prediction_scores_f1_one_and_iou_one() -> None:
    # given
    gt = boxes((10, 10, 20, 20))

    # when
    f1 = image_f1(gt.copy(), np.array([0.9]), gt)
    iou = union_iou(gt.copy(), gt, SHAPE)

    # then
    assert f1 == 1.0
    assert iou == 1.0


def test_boxes_overlapping_by_half_have_iou_one_third() -> None:
    # given: two 10x10 boxes sharing a 5x10 strip -> 50 / (100 + 100 - 50)
    a = boxes((0, 0, 10, 10))
    b = boxes((5, 0, 15, 10))

    # when
    pairwise = box_iou(a, b)
    pixels = union_iou(a, b, SHAPE)

    # then: integer corners, so the pixel IoU equals the geometric one
    assert pairwise.shape == (1, 1)
    assert pairwise[0, 0] == pytest.approx(1 / 3)
    assert pixels == pytest.approx(1 / 3)


def test_box_iou_of_empty_sets_has_the_right_shape() -> None:
    # given
    a = boxes((0, 0, 10, 10), (1, 1, 2, 2))

    # when / then
    assert box_iou(a, NO_BOXES).shape == (2, 0)
    assert box_iou(NO_BOXES, a).shape == (0, 2)


def test_box_iou_rejects_inverted_boxes() -> None:
    # given: x2 < x1
    bad = boxes((10, 0, 0, 10))

    # when / then
    with pytest.raises(ValueError, match="x2 >= x1"):
        box_iou(bad, bad)


def test_union_iou_compares_unions_when_ground_truth_boxes_overlap() -> None:
    # given: two gt boxes whose union covers columns 0..14, rows 0..9 = 150 pixels
    gt = boxes((0, 0, 10, 10), (5, 0, 15, 10))

    # when
    covering = union_iou(boxes((0, 0, 15, 10)), gt, SHAPE)
    first_only = union_iou(boxes((0, 0, 10, 10)), gt, SHAPE)

    # then: one box covering the union is perfect; the first gt box alone covers 100 of 150 pixels
    assert covering == 1.0
    assert first_only == pytest.approx(100 / 150)


def test_union_iou_covers_every_pixel_a_fractional_box_touches() -> None:
    # given: [0.5, 9.2) x [0.5, 9.8) touches pixels 0..9 in both directions
    pred = boxes((0.5, 0.5, 9.2, 9.8))
    gt = boxes((0, 0, 10, 10))

    # when
    iou = union_iou(pred, gt, SHAPE)

    # then
    assert iou == 1.0


def test_union_iou_clips_boxes_to_the_image() -> None:
    # given: a 10x10 image; the gt box passes the top-left corner and keeps 5x5 pixels inside
    gt = boxes((-5, -5, 5, 5))
    pred = boxes((0, 0, 10, 10))

    # when
    iou = union_iou(pred, gt, (10, 10))

    # then: 25 shared pixels over 100
    assert iou == pytest.approx(0.25)


def test_union_iou_edge_cases() -> None:
    # given
    gt = boxes((0, 0, 10, 10))

    # when / then
    assert union_iou(NO_BOXES, NO_BOXES, SHAPE) == 1.0
    assert union_iou(NO_BOXES, gt, SHAPE) == 0.0
    assert union_iou(gt, NO_BOXES, SHAPE) == 0.0


# ---- greedy matching / image F1 ------------------------------------------------------------------


def test_greedy_matching_lets_the_top_scored_prediction_take_its_best_ground_truth() -> None:
    # given: gt A = [0,10), gt B = [4,14). The 0.9 prediction [3,13) has IoU 70/130 = 0.54 with A and
    # 90/110 = 0.82 with B, so it takes B. The 0.8 prediction is B itself; A is all it has left and
    # their IoU is 60/140 = 0.43 < 0.5, so it is a false positive (an optimal matching would find 2).
    gt = boxes((0, 0, 10, 10), (4, 0, 14, 10))
    pred = boxes((3, 0, 13, 10), (4, 0, 14, 10))

    # when
    m = match_greedy(pred, np.array([0.9, 0.8]), gt, 0.5)

    # then
    assert (m.tp, m.fp, m.fn) == (1, 1, 1)
    assert m.matches.tolist() == [[0, 1]]
    assert image_f1(pred, np.array([0.9, 0.8]), gt) == pytest.approx(2 / (2 + 1 + 1))


def test_greedy_matching_follows_scores_not_input_order() -> None:
    # given: the same boxes as above, but the exact copy of B now has the higher score: it takes B,
    # and [3,13) falls back to A with IoU 0.54 >= 0.5
    gt = boxes((0, 0, 10, 10), (4, 0, 14, 10))
    pred = boxes((3, 0, 13, 10), (4, 0, 14, 10))

    # when
    m = match_greedy(pred, np.array([0.7, 0.8]), gt, 0.5)

    # then
    assert (m.tp, m.fp, m.fn) == (2, 0, 0)
    assert m.matches.tolist() == [[1, 1], [0, 0]]


def test_duplicate_predictions_count_as_false_positives() -> None:
    # given: two copies of the same correct box
    gt = boxes((0, 0, 10, 10))
    pred = boxes((0, 0, 10, 10), (0, 0, 10, 10))
    scores = np.array([0.9, 0.8])

    # when
    m = match_greedy(pred, scores, gt, 0.5)
    f1 = image_f1(pred, scores, gt)

    # then: F1 = 2*1 / (2*1 + 1 + 0)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    assert f1 == pytest.approx(2 / 3)


def test_shifted_box_fails_at_iou_half_and_passes_at_a_quarter() -> None:
    # given: IoU 1/3
    gt = boxes((0, 0, 10, 10))
    pred = boxes((5, 0, 15, 10))

    # when / then
    assert image_f1(pred, np.array([0.9]), gt, iou_threshold=0.5) == 0.0
    assert image_f1(pred, np.array([0.9]), gt, iou_threshold=0.25) == 1.0


def test_image_f1_edge_cases() -> None:
    # given
    gt = boxes((0, 0, 10, 10))

    # when / then: nothing to find and nothing claimed is perfect; otherwise the formula gives 0
    assert image_f1(NO_BOXES, np.zeros(0), NO_BOXES) == 1.0
    assert image_f1(gt, np.array([0.5]), NO_BOXES) == 0.0
    assert image_f1(NO_BOXES, np.zeros(0), gt) == 0.0


def test_match_greedy_rejects_a_zero_iou_threshold() -> None:
    # given
    gt = boxes((0, 0, 10, 10))

    # when / then
    with pytest.raises(ValueError, match="iou_threshold"):
        match_greedy(gt, np.array([1.0]), gt, 0.0)


# ---- dataset figures -----------------------------------------------------------------------------


def three_images() -> list[ImageEval]:
    """A perfect defective image, a defective image with a shifted box, a defect-free one with a box."""
    return [
        image("perfect", boxes((0, 0, 10, 10)), boxes((0, 0, 10, 10)), [0.9]),
        image("shifted", boxes((0, 0, 10, 10)), boxes((5, 0, 15, 10)), [0.8]),
        image("clean", NO_BOXES, boxes((30, 30, 40, 40)), [0.7], decision=True),
    ]


def test_study_table_averages_over_images_with_defects_only() -> None:
    # given: F1 1 and 0, IoU 1 and 1/3; the defect-free image is left out
    per_image = three_images()

    # when
    table = study_table(per_image)

    # then
    assert table.n_images == 2
    assert table.avg_f1 == pytest.approx(0.5)
    assert table.avg_iou == pytest.approx((1 + 1 / 3) / 2)
    assert table.best_f1 == 1.0
    assert table.best_iou == 1.0


def test_study_table_drops_predictions_below_the_score_threshold() -> None:
    # given: at threshold 0.85 the shifted image keeps no box: F1 0, IoU 0
    per_image = three_images()

    # when
    table = study_table(per_image, score_threshold=0.85)

    # then
    assert table.avg_f1 == pytest.approx(0.5)
    assert table.avg_iou == pytest.approx(0.5)


def test_box_prf_pools_counts_over_all_images() -> None:
    # given: at IoU 0.5: TP 1, FP 2 (shifted + clean), FN 1; at 0.25 the shifted box matches: 2, 1, 0
    per_image = three_images()

    # when
    at_half = box_prf(per_image, 0.5)
    at_quarter = box_prf(per_image, 0.25)

    # then
    assert at_half == pytest.approx((1 / 3, 1 / 2, 2 / (2 + 2 + 1)))
    assert at_quarter == pytest.approx((2 / 3, 1.0, 4 / (4 + 1 + 0)))


def test_average_precision_of_a_known_ranking() -> None:
    # given: 3 gt boxes; ranked predictions TP, FP, TP, FP, TP (a box on a clean image, a duplicate)
    per_image = [
        image(
            "two",
            boxes((0, 0, 10, 10), (20, 20, 30, 30)),
            boxes((0, 0, 10, 10), (0, 0, 10, 10), (20, 20, 30, 30)),
            [0.9, 0.6, 0.5],
        ),
        image("one", boxes((0, 0, 10, 10)), boxes((0, 0, 10, 10)), [0.7]),
        image("clean", NO_BOXES, boxes((0, 0, 10, 10)), [0.8]),
    ]

    # when
    ap = average_precision(per_image, 0.5)

    # then: precision 1, 1/2, 2/3, 1/2, 3/5 at recall 1/3, 1/3, 2/3, 2/3, 1; the envelope is 1, 2/3, 3/5
    # over the three recall steps of 1/3: AP = (1 + 2/3 + 3/5) / 3 = 34/45
    assert ap == pytest.approx(34 / 45)


def test_average_precision_stops_at_the_recall_reached() -> None:
    # given: one of two gt boxes found, with nothing ranked above it
    per_image = [image("half", boxes((0, 0, 10, 10), (20, 20, 30, 30)), boxes((0, 0, 10, 10)), [0.9])]

    # when / then
    assert average_precision(per_image) == pytest.approx(0.5)


def test_image_level_confusion_matrix() -> None:
    # given
    labels = [True, True, True, False, False]
    decisions = [True, False, True, True, False]

    # when
    result = image_level(labels, decisions)

    # then
    assert result["confusion"] == {"tp": 2, "fp": 1, "fn": 1, "tn": 1}
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    assert result["f1"] == pytest.approx(2 / 3)
    assert result["accuracy"] == pytest.approx(3 / 5)


def test_image_level_with_nothing_flagged_and_nothing_defective_is_perfect() -> None:
    # given / when
    result = image_level([False, False], [False, False])

    # then
    assert (result["precision"], result["recall"], result["f1"], result["accuracy"]) == (1.0, 1.0, 1.0, 1.0)


# ---- calibration ---------------------------------------------------------------------------------


def test_best_f1_threshold_on_a_separable_set_sits_midway_in_the_gap() -> None:
    # given
    scores = [0.9, 0.8, 0.3, 0.1]
    labels = [True, True, False, False]

    # when
    threshold, f1 = best_f1_threshold(scores, labels)

    # then
    assert f1 == 1.0
    assert threshold == pytest.approx((0.8 + 0.3) / 2)


def test_best_f1_threshold_on_a_non_separable_set() -> None:
    # given: flagging >= 0.9, 0.7, 0.6, 0.2 gives F1 2/3, 1/2, 4/5, 2/3
    scores = [0.9, 0.7, 0.6, 0.2]
    labels = [True, False, True, False]

    # when
    threshold, f1 = best_f1_threshold(scores, labels)

    # then
    assert f1 == pytest.approx(0.8)
    assert threshold == pytest.approx((0.6 + 0.2) / 2)


def test_best_f1_threshold_breaks_ties_towards_recall() -> None:
    # given: flagging >= 0.9 gives TP1 FP0 FN1 (F1 2/3); >= 0.3 gives TP2 FP2 FN0 (F1 4/6, the same)
    scores = [0.9, 0.5, 0.4, 0.3]
    labels = [True, False, False, True]

    # when
    threshold, f1 = best_f1_threshold(scores, labels)

    # then: the lower threshold, which misses no defect
    assert f1 == pytest.approx(2 / 3)
    assert threshold == pytest.approx(0.3)


def test_best_f1_threshold_with_all_positive_labels_flags_everything() -> None:
    # given / when
    threshold, f1 = best_f1_threshold([0.2, 0.7], [True, True])

    # then
    assert (threshold, f1) == (0.2, 1.0)


def test_best_f1_threshold_with_all_negative_labels_flags_nothing() -> None:
    # given / when
    threshold, f1 = best_f1_threshold([0.2, 0.7], [False, False])

    # then
    assert f1 == 1.0
    assert threshold > 0.7


def test_best_box_threshold_penalises_boxes_on_defect_free_images() -> None:
    # given: a defective image with a true box (0.9) and a false one (0.4); a clean image with a false
    # box (0.6). Mean F1 at 0.4: (2/3 + 0) / 2; at 0.6: (1 + 0) / 2; at 0.9: (1 + 1) / 2; above: (0 + 1) / 2
    per_image = [
        image("defective", boxes((0, 0, 10, 10)), boxes((0, 0, 10, 10), (30, 30, 40, 40)), [0.9, 0.4]),
        image("clean", NO_BOXES, boxes((30, 30, 40, 40)), [0.6]),
    ]

    # when
    threshold, mean_f1 = best_box_threshold(per_image)
    tied = best_box_threshold(per_image, candidate_thresholds=[0.5, 0.7, 0.8])

    # then: 0.7 and 0.8 both score 1.0; the higher one wins
    assert (threshold, mean_f1) == (0.9, 1.0)
    assert tied == (0.8, 1.0)


def test_best_box_threshold_agrees_with_scoring_each_threshold_directly() -> None:
    # given: random boxes scattered around random ground truths
    rng = np.random.default_rng(0)
    per_image = []
    for i in range(6):
        gt = np.array([[x, y, x + 12, y + 12] for x, y in rng.uniform(0, 40, size=(i % 3, 2))]).reshape(-1, 4)
        xy = rng.uniform(0, 40, size=(8, 2))
        pred = np.concatenate([xy, xy + rng.uniform(6, 14, size=(8, 2))], axis=1)
        per_image.append(image(f"im{i}", gt, pred, list(rng.uniform(0, 1, size=8))))
    candidates = np.linspace(0, 1, 21)

    # when
    threshold, mean_f1 = best_box_threshold(per_image, candidates)

    # then
    direct = {float(t): float(np.mean([im.f1(float(t)) for im in per_image])) for t in candidates}
    assert mean_f1 == pytest.approx(direct[threshold])
    assert mean_f1 == pytest.approx(max(direct.values()))


# ---- records and reporting -----------------------------------------------------------------------


def test_image_eval_rejects_a_label_that_contradicts_the_boxes() -> None:
    # given / when / then
    with pytest.raises(ValueError, match="label=True"):
        ImageEval("x", NO_BOXES, NO_BOXES, np.zeros(0), SHAPE, label=True, decision=False, score=0.0)


def test_evaluate_method_returns_plain_json_and_formats_as_a_table() -> None:
    # given
    per_image = three_images()

    # when
    results = evaluate_method(per_image)
    text = format_table({"ssd": results, "a-much-longer-name": results})

    # then
    assert json.loads(json.dumps(results)) == results
    assert results["study"]["avg_f1"] == pytest.approx(0.5)
    assert results["box"]["iou50"]["tp"] == 1
    assert results["box"]["iou25"]["f1"] == pytest.approx(0.8)
    assert results["image"]["confusion"] == {"tp": 2, "fp": 1, "fn": 0, "tn": 0}
    # ranked TP (0.9), FP (0.8), FP (0.7) over 2 gt boxes: AP = 1 * 1/2
    assert results["ap50"] == pytest.approx(0.5)
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("ssd ")
    assert "0.500" in lines[2]
