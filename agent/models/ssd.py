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
    box_scale: float = Field(
        default=1.0,
        ge=0.5,
        le=2.0,
        description="Reported boxes are grown by this factor about their centre. Calibrated with the box threshold: "
        "how the annotators of the validation images draw a box around a defect the detector finds.",
    )

    def bounds(self) -> dict[str, tuple[float, float]]:
        return {"image": (0.0, 1.0), "box": (0.0, 1.0)}  # detection scores are probabilities


@dataclass(frozen=True)
class SSDOutput(KindOutput):
    """Every detection above the bundle's score floor, after NMS, in original pixels."""

    boxes: np.ndarray
    scores: np.ndarray
    image_hw: tuple[int, int] | None = None  # boxes grown by `box_scale` are clipped to it


def grown(boxes: np.ndarray, factor: float, image_hw: tuple[int, int] | None) -> np.ndarray:
    """(N, 4) boxes scaled by `factor` about their centres, clipped to the image when its size is known."""
    if factor == 1.0 or not len(boxes):
        return boxes
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)
    out = np.concatenate([centre - half, centre + half], axis=1).astype(np.float32)
    if image_hw is not None:
        out[:, [0, 2]] = np.clip(out[:, [0, 2]], 0, image_hw[1])
        out[:, [1, 3]] = np.clip(out[:, [1, 3]], 0, image_hw[0])
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, top_k: int, block: int = 64) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression, best first.

    Greedy NMS in score order: a box is kept unless an already kept box overlaps it by more than
    `iou_threshold`. IoUs are computed `block` rows at a time against all later boxes (one numpy call
    per block rather than several per kept box), and only as far as needed for `top_k` boxes.
    """
    order = np.argsort(-scores, kind="stable")
    ordered = boxes[order]
    areas = _areas(ordered)
    n = order.size
    suppressed = np.zeros(n, dtype=bool)
    keep: list[int] = []
    for start in range(0, n, block):
        if len(keep) >= top_k:
            break
        stop = min(n, start + block)
        rows, cols = slice(start, stop), slice(start, n)
        drop = _iou_above(ordered[rows], areas[rows], ordered[cols], areas[cols], iou_threshold)
        tail = suppressed[start:]  # a view: marks later boxes (and decided earlier ones, harmlessly)
        for k in range(stop - start):
            if tail[k]:
                continue
            keep.append(start + k)
            if len(keep) >= top_k:
                break
            tail |= drop[k]
    return order[np.asarray(keep, dtype=np.int64)]


def _decode(deltas: np.ndarray, anchors: np.ndarray, stds: tuple[float, float, float, float]) -> np.ndarray:
    """Box deltas against (cx, cy, w, h) anchors -> (K, 4) float32 x1, y1, x2, y2 (GluonCV's decoder)."""
    s0, s1, s2, s3 = stds
    cx = deltas[:, 0] * s0 * anchors[:, 2] + anchors[:, 0]
    cy = deltas[:, 1] * s1 * anchors[:, 3] + anchors[:, 1]
    hw = np.exp(deltas[:, 2] * s2) * anchors[:, 2] / 2
    hh = np.exp(deltas[:, 3] * s3) * anchors[:, 3] / 2
    return np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=1).astype(np.float32)


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
        candidates = np.sort(candidates[top])  # anchor order again: equal scores keep the lower anchor first
    boxes = _decode(deltas[candidates], anchors[candidates], post.box_stds)
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


def _iou_above(
    rows: np.ndarray, row_areas: np.ndarray, cols: np.ndarray, col_areas: np.ndarray, thr: float
) -> np.ndarray:
    """(..., R, C) True where IoU > thr (or NaN), computed with exactly `nms`'s float32 operations."""
    iw = np.maximum(
        0.0,
        np.minimum(rows[..., :, None, 2], cols[..., None, :, 2])
        - np.maximum(rows[..., :, None, 0], cols[..., None, :, 0]),
    )
    ih = np.maximum(
        0.0,
        np.minimum(rows[..., :, None, 3], cols[..., None, :, 3])
        - np.maximum(rows[..., :, None, 1], cols[..., None, :, 1]),
    )
    inter = iw * ih
    iou = inter / np.maximum(row_areas[..., :, None] + col_areas[..., None, :] - inter, 1e-9)
    return ~(iou <= thr)


def _areas(boxes: np.ndarray) -> np.ndarray:
    return np.maximum(boxes[..., 2] - boxes[..., 0], 0) * np.maximum(boxes[..., 3] - boxes[..., 1], 0)


class _MergedGreedy:
    """Per-tile NMS and the NMS across tiles in one greedy pass, fed candidates best first.

    The candidates come in one order: score descending, then tile, then anchor. A candidate survives
    its tile unless a surviving candidate of the same tile, earlier in that order, overlaps it (in
    tile pixels, before clipping) or the tile already has `max_detections`; a solid survivor is then
    kept unless an already kept box overlaps it in image pixels. Both decisions depend only on earlier
    candidates, so this pass gives what NMS per tile followed by NMS over the concatenation gives, and
    it is done at the `max_detections`-th kept box: on GDXray frames after ~230 of 12 x 400 candidates.
    """

    def __init__(self, n_tiles: int, post: SSDPost) -> None:
        self.cap, self.thr = post.max_detections, post.nms_iou
        self.across = n_tiles > 1
        # Survivors so far: zero boxes have IoU 0 with anything, so the padding never suppresses.
        self.tile_kept = np.zeros((n_tiles, self.cap, 4), np.float32)
        self.tile_kept_areas = np.zeros((n_tiles, self.cap), np.float32)
        self.tile_count = np.zeros(n_tiles, np.int64)
        self.kept_boxes = np.zeros((self.cap, 4), np.float32)
        self.kept_areas = np.zeros(self.cap, np.float32)
        self.kept_scores = np.zeros(self.cap, np.float32)
        self.kept = 0

    @property
    def done(self) -> bool:
        return self.kept >= self.cap

    def feed(
        self, tile_boxes: np.ndarray, image_boxes: np.ndarray, tiles: np.ndarray, scores: np.ndarray, block: int = 64
    ) -> None:
        """The next candidates, in order; `image_boxes` are clipped to their tile, then to the image."""
        cap, thr = self.cap, self.thr
        solid = (image_boxes[:, 2] > image_boxes[:, 0]) & (image_boxes[:, 3] > image_boxes[:, 1])
        tile_areas, image_areas = _areas(tile_boxes), _areas(image_boxes)
        for start in range(0, tiles.size, block):
            stop = min(tiles.size, start + block)
            t = tiles[start:stop]
            tb, ta = tile_boxes[start:stop], tile_areas[start:stop]
            ib, ia = image_boxes[start:stop], image_areas[start:stop]
            # Suppressed by survivors of earlier blocks, then within the block (same tile only).
            kept_t, kept_ta = self.tile_kept[t], self.tile_kept_areas[t]
            tile_drop = _iou_above(tb[:, None], ta[:, None], kept_t, kept_ta, thr)[:, 0].any(axis=1)
            inside = _iou_above(tb, ta, tb, ta, thr) & (t[:, None] == t[None, :])
            if self.across:
                n = self.kept
                drop = _iou_above(ib, ia, self.kept_boxes[:n], self.kept_areas[:n], thr).any(axis=1)
                between = _iou_above(ib, ia, ib, ia, thr)
            for k in range(stop - start):
                if tile_drop[k]:
                    continue
                tile = t[k]
                slot = self.tile_count[tile]
                if slot >= cap:
                    continue
                self.tile_kept[tile, slot], self.tile_kept_areas[tile, slot] = tb[k], ta[k]
                self.tile_count[tile] = slot + 1
                tile_drop |= inside[k]  # marks earlier rows too, harmlessly: they are decided
                if not solid[start + k]:
                    continue
                if self.across:
                    if drop[k]:
                        continue
                    drop |= between[k]
                self.kept_boxes[self.kept], self.kept_areas[self.kept] = ib[k], ia[k]
                self.kept_scores[self.kept] = scores[start + k]
                self.kept += 1
                if self.kept >= cap:
                    return


FIRST_CHUNK = 1024  # candidates taken first, best scores; ~230 fill the final 100 boxes on GDXray frames


def _first_cut(flat: np.ndarray, size: int) -> float:
    """A score with about `size` of `flat` at or above it, estimated from a strided sample."""
    stride = max(1, flat.size // 4096)
    sample = flat[::stride]
    m = size // stride
    if m >= sample.size or m < 1:
        return -np.inf
    return float(np.partition(sample, sample.size - m)[sample.size - m])


def _rank_in_group(groups: np.ndarray, n_groups: int) -> np.ndarray:
    """0, 1, 2, ... within each group value, in array order."""
    order = np.argsort(groups, kind="stable")
    counts = np.bincount(groups, minlength=n_groups)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size) - np.repeat(starts, counts)
    return rank


# Non-finite heads (an fp16 engine can overflow) give NaN boxes: never reported, so no warnings either.
@np.errstate(invalid="ignore", over="ignore")
def ssd_detections(
    probs: np.ndarray,
    deltas: np.ndarray,
    anchors: np.ndarray,
    post: SSDPost,
    layout: Layout,
    tile_hw: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """All tiles' raw heads -> merged (boxes in original pixels, scores), NMS across tile overlaps.

    The same detections as `decode_ssd_tile` on each tile followed by `nms` over their union
    (tests/agent/test_ssd_post.py holds it to that), in a fraction of the time: the best-scored
    candidates of all tiles are decoded and fed to one greedy pass first, and only when that pass has
    not reached `max_detections` does the rest of each tile's pre-NMS top k follow (8.7 -> ~1.5 ms a
    GDXray frame of 12 tiles).
    """
    n_tiles, n_anchors = probs.shape[:2]
    scores = np.ascontiguousarray(probs[:, :, 1])
    flat = scores.ravel()
    top_k = min(post.pre_nms_top_k, n_anchors)
    greedy = _MergedGreedy(n_tiles, post)
    taken = np.zeros(n_tiles, np.int64)  # candidates of each tile so far (a tile's pre-NMS top k)
    origins = np.asarray(layout.origins, dtype=np.float32)
    th, tw = tile_hw
    sh, sw = layout.scaled_shape
    cut = _first_cut(flat, FIRST_CHUNK)
    above = flat > post.score_floor
    for chunk in (0, 1):
        if chunk == 0:
            idx = np.flatnonzero(above & (flat >= cut))
        else:  # the rest: at most each tile's remaining top k, by score
            rest = np.where(above & (flat < cut), flat, -np.inf).reshape(n_tiles, n_anchors)
            top = (
                np.argpartition(-rest, top_k - 1, axis=1)[:, :top_k]
                if top_k < n_anchors
                else np.arange(n_anchors)[None]
            )
            top = np.sort(np.broadcast_to(top, (n_tiles, top.shape[1])), axis=1)
            idx = (top + (np.arange(n_tiles) * n_anchors)[:, None]).ravel()
            idx = idx[rest.ravel()[idx] > -np.inf]
        # Best first; equal scores by tile, then anchor (the flat index's own order).
        idx = idx[np.argsort(-flat[idx], kind="stable")]
        tiles, anchor_ids = np.divmod(idx, n_anchors)
        ok = taken[tiles] + _rank_in_group(tiles, n_tiles) < top_k
        taken += np.bincount(tiles, minlength=n_tiles)
        tiles, anchor_ids, cand_scores = tiles[ok], anchor_ids[ok], flat[idx[ok]].astype(np.float32)
        if cand_scores.size:
            tile_boxes = _decode(deltas[tiles, anchor_ids], anchors[anchor_ids], post.box_stds)
            image_boxes = tile_boxes.copy()
            image_boxes[:, [0, 2]] = np.clip(image_boxes[:, [0, 2]], 0, tw)
            image_boxes[:, [1, 3]] = np.clip(image_boxes[:, [1, 3]], 0, th)
            # A box entirely outside its tile clips to zero area there and is never reported.
            image_boxes[:, [0, 2]] += origins[tiles, 1:2]
            image_boxes[:, [1, 3]] += origins[tiles, 0:1]
            # Padding beyond the image edge cannot hold a defect.
            image_boxes[:, [0, 2]] = np.clip(image_boxes[:, [0, 2]], 0, sw)
            image_boxes[:, [1, 3]] = np.clip(image_boxes[:, [1, 3]], 0, sh)
            greedy.feed(tile_boxes, image_boxes, tiles, cand_scores)
        if greedy.done or cut == -np.inf:
            break
    if greedy.kept == 0:
        return NO_BOXES, NO_SCORES
    n = greedy.kept
    return layout.to_original(greedy.kept_boxes[:n]), greedy.kept_scores[:n].copy()


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
        return SSDOutput(
            score=float(scores.max()) if scores.size else 0.0,
            boxes=boxes,
            scores=scores,
            image_hw=layout.original_shape,
        )

    @classmethod
    def boxes(cls, out: KindOutput, thresholds: KindThresholds) -> tuple[np.ndarray, np.ndarray]:
        assert isinstance(out, SSDOutput) and isinstance(thresholds, SSDThresholds)
        keep = out.scores >= thresholds.box
        return grown(out.boxes[keep], thresholds.box_scale, out.image_hw), out.scores[keep]
