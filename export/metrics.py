"""Evaluation metrics for defect detection on X-ray images (pure numpy).

Boxes are float arrays of shape (N, 4) holding (x1, y1, x2, y2) in pixels; predicted boxes come with
scores of shape (N,). Every figure is defined in ``docs/evaluation.md``; the docstrings here are the
short form of those definitions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "PRF",
    "ImageEval",
    "Matching",
    "StudyTable",
    "average_precision",
    "best_box_threshold",
    "best_f1_threshold",
    "box_iou",
    "box_prf",
    "evaluate_method",
    "format_table",
    "image_f1",
    "image_level",
    "match_greedy",
    "study_table",
    "union_iou",
]


def _as_boxes(boxes: np.ndarray | Sequence[Sequence[float]], what: str = "boxes") -> np.ndarray:
    """Return ``boxes`` as a float64 (N, 4) array; empty input of any shape becomes (0, 4)."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{what}: expected shape (N, 4) as (x1, y1, x2, y2), got {arr.shape}")
    if np.any(arr[:, 2] < arr[:, 0]) or np.any(arr[:, 3] < arr[:, 1]):
        raise ValueError(f"{what}: expected x2 >= x1 and y2 >= y1 in every box")
    return arr


def _as_scores(scores: np.ndarray | Sequence[float], n: int) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"scores: expected {n} scores (one per predicted box), got {arr.shape[0]}")
    return arr


def _ratio(num: float, den: float) -> float:
    """``num / den``, with 1.0 for 0/0: nothing to find and nothing claimed is a perfect result."""
    return 1.0 if den == 0 else float(num) / float(den)


def _check_iou_threshold(iou_threshold: float) -> None:
    # A threshold of 0 would let a prediction match a ground truth it does not touch.
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold: expected a value in (0, 1], got {iou_threshold}")


# --------------------------------------------------------------------------------------------------
# Box geometry and matching


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of boxes ``a`` (N, 4) and ``b`` (M, 4) -> (N, M).

    Coordinates are continuous (area = (x2 - x1) * (y2 - y1), no "+1"); a pair with zero union
    (two degenerate boxes) has IoU 0.
    """
    a = _as_boxes(a, "a")
    b = _as_boxes(b, "b")
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0.0, None)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    return iou


class Matching(NamedTuple):
    """Result of :func:`match_greedy`; ``matches`` is an int (K, 2) array of (pred index, gt index)."""

    tp: int
    fp: int
    fn: int
    matches: np.ndarray


def match_greedy(pred: np.ndarray, pred_scores: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> Matching:
    """Match predictions to ground truths greedily, the study's rule.

    Predictions are visited by score, highest first (ties keep input order); each takes the still
    unmatched ground truth with the highest IoU, if that IoU is >= ``iou_threshold``. A prediction
    left without a ground truth is a false positive (so duplicates of one defect count as FP); a
    ground truth left unmatched is a false negative.
    """
    _check_iou_threshold(iou_threshold)
    pred = _as_boxes(pred, "pred")
    scores = _as_scores(pred_scores, len(pred))
    gt = _as_boxes(gt, "gt")
    iou = box_iou(pred, gt)
    taken = np.zeros(len(gt), dtype=bool)
    pairs: list[tuple[int, int]] = []
    for p in np.argsort(-scores, kind="stable"):
        if len(gt) == 0:
            break
        candidates = np.where(taken, -1.0, iou[p])
        g = int(np.argmax(candidates))
        if candidates[g] >= iou_threshold:
            taken[g] = True
            pairs.append((int(p), g))
    tp = len(pairs)
    matches = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return Matching(tp=tp, fp=len(pred) - tp, fn=len(gt) - tp, matches=matches)


def image_f1(pred: np.ndarray, scores: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> float:
    """Per-image F1 = 2TP / (2TP + FP + FN) from :func:`match_greedy`.

    Edge cases follow from the formula, with 0/0 defined as 1.0: no predictions and no ground truth
    -> 1.0; predictions on an image without ground truth -> 0.0; ground truth and no predictions -> 0.0.
    """
    m = match_greedy(pred, scores, gt, iou_threshold)
    return _ratio(2 * m.tp, 2 * m.tp + m.fp + m.fn)


def _box_mask(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise boxes into a boolean (H, W) mask; a box covers columns [floor(x1), ceil(x2))."""
    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        c0, c1 = max(math.floor(x1), 0), min(math.ceil(x2), w)
        r0, r1 = max(math.floor(y1), 0), min(math.ceil(y2), h)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask


def union_iou(pred: np.ndarray, gt: np.ndarray, shape: tuple[int, ...]) -> float:
    """Pixel IoU between the union of predicted boxes and the union of ground-truth boxes.

    Boxes are rasterised into boolean masks of ``shape[:2]`` = (H, W). A box covers the pixel columns
    [floor(x1), ceil(x2)) and rows [floor(y1), ceil(y2)), clipped to the image, so pixel i spans
    [i, i + 1) and a box with integer corners covers exactly its area. Both masks empty -> 1.0;
    exactly one empty -> 0.0 (so no predictions on a defective image scores 0).
    """
    hw = (int(shape[0]), int(shape[1]))
    p = _box_mask(_as_boxes(pred, "pred"), hw)
    g = _box_mask(_as_boxes(gt, "gt"), hw)
    return _ratio(int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g)))


# --------------------------------------------------------------------------------------------------
# Per-image record and dataset-level figures


@dataclass(frozen=True, eq=False)
class ImageEval:
    """One test image: its ground truth and what a method predicted for it.

    ``pred_boxes``/``pred_scores`` are the method's raw detections; the box-level figures keep those
    with score >= the ``score_threshold`` they are given, AP ranks them all. ``label`` is the truth
    (defective = at least one ground-truth box; checked), ``decision`` and ``score`` are the method's
    image-level verdict and score.
    """

    name: str
    gt_boxes: np.ndarray
    pred_boxes: np.ndarray
    pred_scores: np.ndarray
    shape: tuple[int, int]
    label: bool
    decision: bool
    score: float

    def __post_init__(self) -> None:
        # Frozen, so normalise through object.__setattr__; later code can rely on (N, 4) float arrays.
        pred = _as_boxes(self.pred_boxes, f"{self.name}: pred_boxes")
        object.__setattr__(self, "gt_boxes", _as_boxes(self.gt_boxes, f"{self.name}: gt_boxes"))
        object.__setattr__(self, "pred_boxes", pred)
        object.__setattr__(self, "pred_scores", _as_scores(self.pred_scores, len(pred)))
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        object.__setattr__(self, "label", bool(self.label))
        object.__setattr__(self, "decision", bool(self.decision))
        object.__setattr__(self, "score", float(self.score))
        # GDXray has no "defective but unboxed" images, so a mismatch means the caller mixed up data.
        if self.label != self.has_defects:
            raise ValueError(
                f"{self.name}: label={self.label} but the image has {len(self.gt_boxes)} ground-truth boxes"
            )

    @property
    def has_defects(self) -> bool:
        """True when the image has at least one ground-truth box."""
        return len(self.gt_boxes) > 0

    def kept(self, score_threshold: float) -> tuple[np.ndarray, np.ndarray]:
        """Predicted boxes and scores with score >= ``score_threshold``."""
        keep = self.pred_scores >= score_threshold
        return self.pred_boxes[keep], self.pred_scores[keep]

    def f1(self, score_threshold: float = 0.0, iou_threshold: float = 0.5) -> float:
        """:func:`image_f1` of the kept predictions."""
        boxes, scores = self.kept(score_threshold)
        return image_f1(boxes, scores, self.gt_boxes, iou_threshold)

    def iou(self, score_threshold: float = 0.0) -> float:
        """:func:`union_iou` of the kept predictions."""
        boxes, _ = self.kept(score_threshold)
        return union_iou(boxes, self.gt_boxes, self.shape)


@dataclass(frozen=True)
class StudyTable:
    """The study's table, over test images with defects only."""

    avg_f1: float
    avg_iou: float
    best_f1: float
    best_iou: float
    n_images: int


def study_table(per_image: Sequence[ImageEval], score_threshold: float = 0.0, iou_threshold: float = 0.5) -> StudyTable:
    """Mean and max of per-image F1 (at ``iou_threshold``) and union IoU over images with defects.

    Defect-free images do not enter this table (their false alarms show in :func:`box_prf` and
    :func:`image_level`).
    """
    defective = [im for im in per_image if im.has_defects]
    if not defective:
        raise ValueError("study_table: no image with defects among the given images")
    f1 = np.array([im.f1(score_threshold, iou_threshold) for im in defective])
    iou = np.array([im.iou(score_threshold) for im in defective])
    return StudyTable(
        avg_f1=float(f1.mean()),
        avg_iou=float(iou.mean()),
        best_f1=float(f1.max()),
        best_iou=float(iou.max()),
        n_images=len(defective),
    )


class PRF(NamedTuple):
    """Precision, recall and F1."""

    precision: float
    recall: float
    f1: float


def _prf(tp: int, fp: int, fn: int) -> PRF:
    # 0/0 is 1.0 throughout: no claim means no false claim, nothing to find means nothing missed.
    return PRF(_ratio(tp, tp + fp), _ratio(tp, tp + fn), _ratio(2 * tp, 2 * tp + fp + fn))


def _pooled_counts(
    per_image: Sequence[ImageEval], iou_threshold: float, score_threshold: float
) -> tuple[int, int, int]:
    tp = fp = fn = 0
    for im in per_image:
        boxes, scores = im.kept(score_threshold)
        m = match_greedy(boxes, scores, im.gt_boxes, iou_threshold)
        tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
    return tp, fp, fn


def box_prf(per_image: Sequence[ImageEval], iou_threshold: float = 0.5, score_threshold: float = 0.0) -> PRF:
    """Box precision, recall and F1 from TP/FP/FN summed over all images (defect-free ones included)."""
    return _prf(*_pooled_counts(per_image, iou_threshold, score_threshold))


def average_precision(per_image: Sequence[ImageEval], iou_threshold: float = 0.5) -> float:
    """AP at ``iou_threshold`` (AP50 by default) with VOC all-point interpolation.

    All predictions of all images are ranked by score (ties keep input order) and marked TP/FP by the
    per-image greedy matching; recall is over all ground-truth boxes of all images. AP is the area
    under the precision envelope (precision made monotonically non-increasing) against recall.
    """
    scores: list[np.ndarray] = []
    hits: list[np.ndarray] = []
    n_gt = 0
    for im in per_image:
        m = match_greedy(im.pred_boxes, im.pred_scores, im.gt_boxes, iou_threshold)
        hit = np.zeros(len(im.pred_boxes), dtype=bool)
        hit[m.matches[:, 0]] = True
        scores.append(im.pred_scores)
        hits.append(hit)
        n_gt += len(im.gt_boxes)
    if n_gt == 0:
        raise ValueError("average_precision: no ground-truth boxes among the given images")
    all_scores = np.concatenate(scores) if scores else np.zeros(0)
    all_hits = np.concatenate(hits) if hits else np.zeros(0, dtype=bool)
    order = np.argsort(-all_scores, kind="stable")
    tp = np.cumsum(all_hits[order])
    fp = np.cumsum(~all_hits[order])
    recall = tp / n_gt
    precision = tp / np.maximum(tp + fp, 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def image_level(labels: np.ndarray | Sequence[bool], decisions: np.ndarray | Sequence[bool]) -> dict[str, Any]:
    """Image-level precision, recall, F1, accuracy and confusion counts; positive = defective.

    Ratios with a zero denominator are 1.0 (see ``docs/evaluation.md``).
    """
    y = np.asarray(labels, dtype=bool).reshape(-1)
    d = np.asarray(decisions, dtype=bool).reshape(-1)
    if y.shape != d.shape:
        raise ValueError(f"image_level: {y.size} labels but {d.size} decisions")
    tp = int(np.count_nonzero(y & d))
    fp = int(np.count_nonzero(~y & d))
    fn = int(np.count_nonzero(y & ~d))
    tn = int(np.count_nonzero(~y & ~d))
    prf = _prf(tp, fp, fn)
    return {
        "precision": prf.precision,
        "recall": prf.recall,
        "f1": prf.f1,
        "accuracy": _ratio(tp + tn, y.size),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
    }


# --------------------------------------------------------------------------------------------------
# Calibration (on the validation split, never on test)


def best_f1_threshold(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool]) -> tuple[float, float]:
    """Image-score threshold maximising image-level F1; the decision is ``score >= threshold``.

    Ties between maxima go to the lowest threshold, i.e. the highest recall: F1 weighs a missed defect
    and a false alarm alike, and on a casting line an escape costs more than a re-inspection. The
    returned threshold sits midway between the lowest flagged score and the next lower score (the
    widest margin with the same validation F1). All-negative labels give a threshold just above the
    highest score (flag nothing, F1 = 1.0); all-positive labels give the lowest score (flag all).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if s.size == 0 or s.shape != y.shape:
        raise ValueError(f"best_f1_threshold: expected as many labels as scores (> 0), got {y.size}, {s.size}")
    levels = np.unique(s)[::-1]  # candidate thresholds, highest first
    order = np.argsort(-s, kind="stable")
    # Flag every image with score >= levels[k]: counts from cumulative sums at each level's last index.
    last = np.searchsorted(-s[order], -levels, side="right") - 1
    tp = np.cumsum(y[order])[last]
    fp = np.cumsum(~y[order])[last]
    n_pos = int(np.count_nonzero(y))
    # Candidate 0 flags nothing; with any positive it scores 0, otherwise 0/0 = 1.0.
    tp = np.concatenate([[0], tp])
    fp = np.concatenate([[0], fp])
    den = 2 * tp + fp + (n_pos - tp)
    f1 = np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0)
    # Each F1 is one correctly rounded division of integers, so equal ratios compare equal exactly.
    k = int(np.flatnonzero(f1 == f1.max())[-1])
    if k == 0:
        return float(np.nextafter(levels[0], np.inf)), float(f1[0])
    chosen = levels[k - 1]
    threshold = (chosen + levels[k]) / 2.0 if k < len(levels) else chosen
    return float(threshold), float(f1[k])


def best_box_threshold(
    per_image: Sequence[ImageEval],
    candidate_thresholds: Sequence[float] | None = None,
    iou_threshold: float = 0.5,
) -> tuple[float, float]:
    """Detection score threshold maximising the mean per-image F1 over ALL the given images.

    This is the study's avg F1 extended to defect-free images through :func:`image_f1`'s own edge
    case: a defect-free image scores 1.0 with no kept box and 0.0 with any. Optimising the study's
    avg F1 over defective images alone would reward a threshold of 0 (boxes are never penalised where
    there is no defect). Each image weighs the same, as in the study's table. Candidates default to
    every distinct prediction score plus one just above the highest (keep nothing); ties go to the
    highest threshold (fewer boxes for the same F1). Returns (threshold, mean F1).
    """
    if not per_image:
        raise ValueError("best_box_threshold: no images")
    if candidate_thresholds is None:
        all_scores = np.unique(np.concatenate([im.pred_scores for im in per_image]))
        top = np.nextafter(all_scores[-1], np.inf) if all_scores.size else 0.0
        candidates = np.append(all_scores, top)
    else:
        candidates = np.unique(np.asarray(candidate_thresholds, dtype=np.float64))
        if candidates.size == 0:
            raise ValueError("best_box_threshold: empty candidate_thresholds")
    # Greedy matching visits boxes by score, so the matching of the boxes kept at any threshold is a
    # prefix of the full matching: one matching per image gives its F1 at every candidate at once.
    total = np.zeros(candidates.size)
    for im in per_image:
        m = match_greedy(im.pred_boxes, im.pred_scores, im.gt_boxes, iou_threshold)
        order = np.argsort(-im.pred_scores, kind="stable")
        hit = np.zeros(len(order), dtype=bool)
        hit[m.matches[:, 0]] = True
        tp_prefix = np.concatenate([[0], np.cumsum(hit[order])])
        kept = np.searchsorted(-im.pred_scores[order], -candidates, side="right")
        tp = tp_prefix[kept]
        den = 2 * tp + (kept - tp) + (len(im.gt_boxes) - tp)
        total += np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0)
    means = total / len(per_image)
    k = int(np.flatnonzero(means == means.max())[-1])
    return float(candidates[k]), float(means[k])


# --------------------------------------------------------------------------------------------------
# Reporting


def evaluate_method(per_image: Sequence[ImageEval], score_threshold: float = 0.0) -> dict[str, Any]:
    """Every figure for one method on one split, as a JSON-serialisable dict.

    Box-level figures use predictions with score >= ``score_threshold``; AP50 ranks all predictions.
    Raises ValueError when no image has a ground-truth box (the study table and AP are undefined).
    """
    box: dict[str, Any] = {}
    for name, thr in (("iou50", 0.5), ("iou25", 0.25)):
        tp, fp, fn = _pooled_counts(per_image, thr, score_threshold)
        box[name] = {**_prf(tp, fp, fn)._asdict(), "tp": tp, "fp": fp, "fn": fn}
    return {
        "n_images": len(per_image),
        "n_defect_images": sum(im.has_defects for im in per_image),
        "score_threshold": float(score_threshold),
        "study": dataclasses.asdict(study_table(per_image, score_threshold)),
        "box": box,
        "ap50": average_precision(per_image, 0.5),
        "image": image_level([im.label for im in per_image], [im.decision for im in per_image]),
        "per_image": [
            {"name": im.name, "label": im.label, "f1": im.f1(score_threshold), "iou": im.iou(score_threshold)}
            for im in per_image
        ],
    }


_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("avg F1", ("study", "avg_f1")),
    ("avg IoU", ("study", "avg_iou")),
    ("best F1", ("study", "best_f1")),
    ("best IoU", ("study", "best_iou")),
    ("P@.5", ("box", "iou50", "precision")),
    ("R@.5", ("box", "iou50", "recall")),
    ("F1@.5", ("box", "iou50", "f1")),
    ("F1@.25", ("box", "iou25", "f1")),
    ("AP50", ("ap50",)),
    ("img P", ("image", "precision")),
    ("img R", ("image", "recall")),
    ("img F1", ("image", "f1")),
)


def format_table(results_by_method: Mapping[str, Mapping[str, Any]]) -> str:
    """Plain-text table of :func:`evaluate_method` results: one row per method, three decimals."""
    width = max([len("method"), *(len(m) for m in results_by_method)])
    header = "method".ljust(width) + "".join(f"  {title:>8}" for title, _ in _COLUMNS)
    lines = [header, "-" * len(header)]
    for method, results in results_by_method.items():
        cells = []
        for _, path in _COLUMNS:
            value: Any = results
            for key in path:
                value = value.get(key) if isinstance(value, Mapping) else None
            # A method without boxes (the classifier) has no localisation figures.
            cells.append(f"  {'-':>8}" if value is None else f"  {value:>8.3f}")
        lines.append(method.ljust(width) + "".join(cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Ranking and operating points


def auroc(scores: np.ndarray | Sequence[float], labels: np.ndarray | Sequence[bool]) -> float | None:
    """Area under the ROC curve (probability a defective image outranks a normal one; ties count half).

    None when one class is missing (the area is undefined, not 0.5).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"auroc: {y.size} labels but {s.size} scores")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # Mann-Whitney U from average ranks (ties share their mean rank).
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
    ends = np.r_[starts[1:], s.size]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # mean of ranks a+1..b
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def false_alarm_levels(normal_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """For each score: the share of normal images scoring at least as high (the false-alarm rate of the
    loosest threshold that still flags it). 0 where there is no normal image to compare with."""
    n = np.sort(np.asarray(normal_scores, dtype=np.float64).reshape(-1))
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if n.size == 0:
        return np.zeros(s.size)
    return (n.size - np.searchsorted(n, s, side="left")) / n.size
