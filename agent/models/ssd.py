"""SSD detector: raw heads in the graph, box decode and NMS here.

MXNet's exported detection head disagreed with MXNet itself, so the graph ends at the raw heads (see
docs/ARCHITECTURE.md). The functions mirror GluonCV's NormalizedBoxCenterDecoder +
MultiPerClassDecoder + box_nms; the build proves they agree with GluonCV on real tiles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field

from lineside.agent.bundle.schema import FileRef
from lineside.agent.inference.preprocess import Layout
from lineside.agent.models.base import NO_BOXES, NO_SCORES, KindOutput, KindPost, KindThresholds, ModelKind

if TYPE_CHECKING:
    from lineside.agent.bundle.loader import LoadedBundle
    from lineside.agent.bundle.manifest import ModelSpec


class SSDPost(KindPost):
    """Decoding of the raw SSD heads, done outside the graph (see docs/ARCHITECTURE.md)."""

    kind: Literal["ssd"] = "ssd"
    anchors: FileRef = Field(description="float32 .npy of shape (A, 4), center form (cx, cy, w, h), pixels.")
    box_stds: tuple[float, float, float, float] = Field(default=(0.1, 0.1, 0.2, 0.2))
    nms_iou: float = Field(default=0.45, gt=0, le=1)
    pre_nms_top_k: int = Field(default=400, gt=0)
    max_detections: int = Field(default=100, gt=0)
    score_floor: float = Field(default=0.01, ge=0, lt=1, description="Scores below are never kept.")


class SSDThresholds(KindThresholds):
    kind: Literal["ssd"] = "ssd"
    image: float = Field(default=0.5, description="Best box score at or above which the SSD fires for the image.")
    box: float = Field(default=0.5, description="Detection score at or above which a box is reported.")

    def bounds(self) -> dict[str, tuple[float, float]]:
        return {"image": (0.0, 1.0), "box": (0.0, 1.0)}  # detection scores are probabilities


@dataclass(frozen=True)
class SSDOutput(KindOutput):
    """Every detection above the bundle's score floor, after NMS, in original pixels."""

    boxes: np.ndarray
    scores: np.ndarray


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, top_k: int, block: int = 64) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best first.

    Greedy NMS in score order: a box is kept unless an already kept box overlaps it by more than
    `iou_threshold`. IoUs are computed `block` rows at a time against all later boxes (one numpy call
    per block rather than several per kept box), and only as far as needed for `top_k` boxes.
    """
    order = np.argsort(-scores, kind="stable")
    ordered = boxes[order]
    x1, y1, x2, y2 = ordered[:, 0], ordered[:, 1], ordered[:, 2], ordered[:, 3]
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    n = order.size
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for start in range(0, n, block):
        if len(keep) >= top_k:
            break
        stop = min(n, start + block)
        rows, cols = slice(start, stop), slice(start, n)
        iw = np.maximum(0.0, np.minimum(x2[rows, None], x2[None, cols]) - np.maximum(x1[rows, None], x1[None, cols]))
        ih = np.maximum(0.0, np.minimum(y2[rows, None], y2[None, cols]) - np.maximum(y1[rows, None], y1[None, cols]))
        inter = iw * ih
        iou = inter / np.maximum(areas[rows, None] + areas[None, cols] - inter, 1e-9)
        drop = ~(iou <= iou_threshold)  # not `>`: a NaN IoU suppresses, as it always has
        tail = suppressed[start:]  # a view: marks later boxes (and decided earlier ones, harmlessly)
        for k in range(stop - start):
            if tail[k]:
                continue
            keep.append(start + k)
            if len(keep) >= top_k:
                break
            tail |= drop[k]
    return order[np.asarray(keep, dtype=np.int64)]


def decode_ssd_tile(
    probs: np.ndarray, deltas: np.ndarray, anchors: np.ndarray, post: SSDPost, tile_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One tile's raw heads -> (boxes (K,4) in tile pixels, scores (K,)) after per-tile NMS."""
    scores = probs[:, 1]
    candidates = np.flatnonzero(scores > post.score_floor)
    if candidates.size == 0:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    if candidates.size > post.pre_nms_top_k:
        top = np.argpartition(-scores[candidates], post.pre_nms_top_k - 1)[: post.pre_nms_top_k]
        candidates = candidates[top]
    a = anchors[candidates]
    d = deltas[candidates]
    s0, s1, s2, s3 = post.box_stds
    cx = d[:, 0] * s0 * a[:, 2] + a[:, 0]
    cy = d[:, 1] * s1 * a[:, 3] + a[:, 1]
    hw = np.exp(d[:, 2] * s2) * a[:, 2] / 2
    hh = np.exp(d[:, 3] * s3) * a[:, 3] / 2
    boxes = np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=1).astype(np.float32)
    tile_scores = scores[candidates].astype(np.float32)
    # Suppress before clipping, as GluonCV does, so both keep the same boxes.
    keep = nms(boxes, tile_scores, post.nms_iou, post.max_detections)
    boxes, tile_scores = boxes[keep], tile_scores[keep]
    th, tw = tile_hw
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, tw)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, th)
    # A box entirely outside the tile clips to zero area: nothing to report.
    solid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[solid], tile_scores[solid]


def ssd_detections(
    probs: np.ndarray,
    deltas: np.ndarray,
    anchors: np.ndarray,
    post: SSDPost,
    layout: Layout,
    tile_hw: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """All tiles' raw heads -> merged (boxes in original pixels, scores), NMS across tile overlaps."""
    all_boxes, all_scores = [], []
    sh, sw = layout.scaled_shape
    for i, (y, x) in enumerate(layout.origins):
        boxes, scores = decode_ssd_tile(probs[i], deltas[i], anchors, post, tile_hw)
        if len(scores):
            boxes[:, [0, 2]] += x
            boxes[:, [1, 3]] += y
            # Padding beyond the image edge cannot hold a defect.
            boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, sw)
            boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, sh)
            all_boxes.append(boxes)
            all_scores.append(scores)
    if not all_boxes:
        return NO_BOXES, NO_SCORES
    boxes = np.concatenate(all_boxes)
    scores = np.concatenate(all_scores)
    if len(layout.origins) > 1:
        keep = nms(boxes, scores, post.nms_iou, post.max_detections)
        boxes, scores = boxes[keep], scores[keep]
    return layout.to_original(boxes), scores


class SSD(ModelKind):
    name = "ssd"
    output_names = ("class_probs", "box_deltas")
    post_class = SSDPost
    thresholds_class = SSDThresholds
    localiser = True

    def __init__(self, spec: ModelSpec, bundle: LoadedBundle) -> None:
        super().__init__(spec, bundle)
        assert isinstance(spec.postprocessing, SSDPost)
        self.post = spec.postprocessing
        self.anchors = np.load(bundle.path(self.post.anchors)).astype(np.float32)

    @classmethod
    def extra_files(cls, post: KindPost) -> list[FileRef]:
        assert isinstance(post, SSDPost)
        return [post.anchors]

    def outputs(self, tensors: dict[str, np.ndarray], unit: np.ndarray, layout: Layout) -> SSDOutput:
        boxes, scores = ssd_detections(
            tensors["class_probs"],
            tensors["box_deltas"],
            self.anchors,
            self.post,
            layout,
            self.spec.preprocessing.input_size,
        )
        return SSDOutput(score=float(scores.max()) if scores.size else 0.0, boxes=boxes, scores=scores)

    @classmethod
    def boxes(cls, out: KindOutput, thresholds: KindThresholds) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(out, SSDOutput) and isinstance(thresholds, SSDThresholds)
        keep = out.scores >= thresholds.box
        return out.boxes[keep], out.scores[keep]
