"""Model outputs -> image scores, anomaly maps and boxes in original pixels.

The SSD box decode and NMS live here rather than in the ONNX graph: MXNet's exported detection head
disagreed with MXNet itself, so the graph ends at the raw heads (see docs/ARCHITECTURE.md). The
functions mirror GluonCV's NormalizedBoxCenterDecoder + MultiPerClassDecoder + box_nms.
"""

from __future__ import annotations

import cv2
import numpy as np

from lineside.agent.bundle.manifest import SSDPost, VAEPost
from lineside.agent.inference.preprocess import Layout, scaled_unit


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
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    boxes = np.concatenate(all_boxes)
    scores = np.concatenate(all_scores)
    if len(layout.origins) > 1:
        keep = nms(boxes, scores, post.nms_iou, post.max_detections)
        boxes, scores = boxes[keep], scores[keep]
    return layout.to_original(boxes), scores


def vae_anomaly_map(
    unit: np.ndarray, recon: np.ndarray, post: VAEPost, layout: Layout, tile_hw: tuple[int, int]
) -> np.ndarray:
    """The study's anomaly map, in original pixels.

    squared reconstruction residual per tile -> stitched (max over overlaps, tile borders ignored)
    -> L2-normalised over the image -> multiplied with the original for contrast
    -> Gaussian smoothing.
    """
    scaled = scaled_unit(unit, layout)
    sh, sw = scaled.shape
    th, tw = tile_hw
    residual = np.zeros((sh, sw), np.float32)
    b = post.border
    for i, (y, x) in enumerate(layout.origins):
        ch, cw = min(th, sh - y), min(tw, sw - x)
        diff = recon[i, 0, :ch, :cw] - scaled[y : y + ch, x : x + cw]
        sq = diff * diff
        # Ignore a tile's outer border: convolutions reconstruct worst there. Inside the image an
        # overlapping tile covers it; at the image edge those few pixels are given up.
        top, left, bottom, right = b, b, ch - b, cw - b
        region = residual[y + top : y + bottom, x + left : x + right]
        np.maximum(region, sq[top:bottom, left:right], out=region)
    # L2 normalisation, scaled by sqrt(pixels) so the map's level does not depend on image size.
    norm = float(np.sqrt(np.sum(residual.astype(np.float64) ** 2) / residual.size))
    anomaly = residual / max(norm, 1e-12) * scaled
    if post.blur_sigma > 0:
        anomaly = cv2.GaussianBlur(anomaly, (0, 0), post.blur_sigma)
    oh, ow = layout.original_shape
    if (sh, sw) != (oh, ow):
        anomaly = cv2.resize(anomaly, (ow, oh), interpolation=cv2.INTER_LINEAR)
    return anomaly.astype(np.float32, copy=False)


def image_score_from_map(anomaly: np.ndarray, quantile: float) -> float:
    """A robust maximum of the anomaly map."""
    if quantile >= 1.0:
        return float(anomaly.max())
    k = min(anomaly.size - 1, round(quantile * (anomaly.size - 1)))
    return float(np.partition(anomaly.ravel(), k)[k])


def vae_boxes(anomaly: np.ndarray, pixel_threshold: float, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """Binary mask -> connected components of at least `min_area` px -> (boxes, peak scores)."""
    mask = (anomaly >= pixel_threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    boxes, scores = [], []
    for label in range(1, count):
        x, y, w, h, area = stats[label]
        if area < min_area:
            continue
        boxes.append((x, y, x + w, y + h))
        scores.append(float(anomaly[y : y + h, x : x + w][labels[y : y + h, x : x + w] == label].max()))
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    return np.asarray(boxes, np.float32), np.asarray(scores, np.float32)


def calibrated_score(score: float, threshold: float) -> float:
    """Map a raw score to [0, 1] so that `threshold` lands on 0.5 (monotone, continuous)."""
    if threshold <= 0:
        return 1.0 if score >= threshold else 0.0
    if score < threshold:
        return max(0.0, 0.5 * score / threshold)
    return 1.0 - 0.5 * threshold / score
