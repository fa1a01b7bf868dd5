"""The SSD's frame post-processing (one greedy pass over every tile) against its definition.

The definition is the slow, obvious composition: `decode_ssd_tile` on each tile (the per-tile decode
and NMS the build proves equal to GluonCV's), shift into the image, then `nms` across the tiles.
`ssd_detections` skips the candidates that cannot reach the final `max_detections`; these tests hold it
to exactly the same boxes and scores, on random heads built to stress each rule and on the real SSD's
heads from our export stage.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest

from lineside.agent.imaging import read_image
from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.preprocess import Layout
from lineside.agent.models.base import NO_BOXES, NO_SCORES
from lineside.agent.models.ssd import (
    SSD,
    SSDOutput,
    SSDPost,
    SSDThresholds,
    decode_ssd_tile,
    grown,
    nms,
    ssd_detections,
)


def reference_detections(
    probs: np.ndarray, deltas: np.ndarray, anchors: np.ndarray, post: SSDPost, layout: Layout, tile_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """NMS per tile, then NMS over the union of the tiles' boxes inside the image: what the fast path must equal."""
    all_boxes, all_scores = [], []
    sh, sw = layout.scaled_shape
    for i, (y, x) in enumerate(layout.origins):
        boxes, scores = decode_ssd_tile(probs[i], deltas[i], anchors, post, tile_hw)
        boxes[:, [0, 2]] += x
        boxes[:, [1, 3]] += y
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, sw)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, sh)
        # A box wholly in the padding beyond the image's edge clips to nothing there: never reported.
        solid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        all_boxes.append(boxes[solid])
        all_scores.append(scores[solid])
    boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
    if not scores.size:
        return NO_BOXES, NO_SCORES
    if len(layout.origins) > 1:
        keep = nms(boxes, scores, post.nms_iou, post.max_detections)
        boxes, scores = boxes[keep], scores[keep]
    return layout.to_original(boxes), scores


def _anchors(rng: np.random.Generator, count: int, tile: int, spread: float = 0.1) -> np.ndarray:
    """Dense, overlapping anchors (cx, cy, w, h), some reaching past the tile's edge (or wholly outside)."""
    centres = rng.uniform(-spread * tile, (1 + spread) * tile, size=(count, 2))
    sizes = rng.uniform(6, 0.5 * tile, size=(count, 2))
    return np.concatenate([centres, sizes], axis=1).astype(np.float32)


def _layout(tiles: int, tile: int, scale: float = 1.0) -> Layout:
    origins = tuple((int(r * tile * 0.75), int(c * tile * 0.75)) for r in range(2) for c in range(6))[:tiles]
    h = max(y for y, _ in origins) + tile
    w = max(x for _, x in origins) + tile - 7  # the last tile reaches past the image: padding
    return Layout(origins, (h, w), scale, scale, (round(h / scale), round(w / scale)))


def _heads(rng: np.random.Generator, tiles: int, count: int, *, levels: int = 0) -> tuple[np.ndarray, np.ndarray]:
    score = rng.beta(0.6, 4.0, size=(tiles, count)).astype(np.float32)
    if levels:
        score = np.round(score * levels) / levels  # many exactly equal scores
    probs = np.stack([1 - score, score], axis=2).astype(np.float32)
    deltas = rng.normal(0, 1.5, size=(tiles, count, 4)).astype(np.float32)
    return probs, deltas


def _assert_same(fast: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> None:
    assert fast[0].shape == ref[0].shape
    np.testing.assert_array_equal(fast[1], ref[1])
    np.testing.assert_array_equal(fast[0], ref[0])


@pytest.mark.parametrize(
    ("tiles", "count", "post_kw", "scale", "spread"),
    [
        (12, 900, {}, 1.0, 0.1),  # more candidates than pre_nms_top_k, the final cap reached
        (12, 900, {"max_detections": 7}, 0.5, 0.1),  # tiny caps, boxes scaled back to original pixels
        (12, 300, {"pre_nms_top_k": 1000, "score_floor": 0.2}, 1.0, 0.1),  # the floor leaves few candidates
        (5, 900, {"nms_iou": 0.2, "max_detections": 30}, 1.0, 0.1),  # per-tile caps bind before the final one
        (1, 900, {}, 2.0, 0.1),  # one tile: no NMS across tiles
        # a small pre-NMS top k binds in every tile
        (12, 900, {"pre_nms_top_k": 25}, 1.0, 0.1),
        # the final cap cannot be reached: every tile's whole top k is read, past the first chunk
        (3, 3000, {"pre_nms_top_k": 700, "max_detections": 1000}, 1.0, 0.1),
        # most boxes wholly outside their tile: they fill a tile's cap without ever being reported
        (4, 900, {"max_detections": 25}, 1.0, 2.0),
        (12, 600, {"score_floor": 0.99}, 1.0, 0.1),  # nothing above the floor
    ],
)
def test_equals_per_tile_nms_then_nms_across_tiles(
    tiles: int, count: int, post_kw: dict, scale: float, spread: float
) -> None:
    rng = np.random.default_rng(tiles * 1000 + count)
    tile = 128
    anchors = _anchors(rng, count, tile, spread)
    post = SSDPost(anchors={"path": "anchors.npy", "sha256": "0" * 64}, **post_kw)
    layout = _layout(tiles, tile, scale)
    for _ in range(4):
        probs, deltas = _heads(rng, tiles, count)
        fast = ssd_detections(probs, deltas, anchors, post, layout, (tile, tile))
        _assert_same(fast, reference_detections(probs, deltas, anchors, post, layout, (tile, tile)))


def test_equal_scores_rank_by_tile_then_anchor_as_the_reference_does() -> None:
    """Quantised scores: every NMS decision between equal scores must fall the same way."""
    rng = np.random.default_rng(7)
    tile, count = 128, 400
    anchors = _anchors(rng, count, tile)
    # pre_nms_top_k >= anchors: which of a tie enters the top k is then not arbitrary.
    post = SSDPost(anchors={"path": "anchors.npy", "sha256": "0" * 64}, pre_nms_top_k=count, max_detections=60)
    layout = _layout(12, tile)
    ties = 0
    for _ in range(6):
        probs, deltas = _heads(rng, 12, count, levels=20)
        fast = ssd_detections(probs, deltas, anchors, post, layout, (tile, tile))
        _assert_same(fast, reference_detections(probs, deltas, anchors, post, layout, (tile, tile)))
        ties += len(fast[1]) - len(np.unique(fast[1]))
    assert ties > 50  # the case was really exercised: kept boxes with equal scores


def test_stops_early_yet_reports_the_best_boxes_first() -> None:
    rng = np.random.default_rng(3)
    anchors = _anchors(rng, 900, 128)
    post = SSDPost(anchors={"path": "anchors.npy", "sha256": "0" * 64}, max_detections=20)
    probs, deltas = _heads(rng, 12, 900)
    _boxes, scores = ssd_detections(probs, deltas, anchors, post, _layout(12, 128), (128, 128))
    assert len(scores) == 20
    assert np.all(np.diff(scores) <= 0)
    assert scores[0] == pytest.approx(float(probs[:, :, 1].max()))


def test_real_ssd_heads_from_the_test_bundle(test_bundle: Path) -> None:
    """The SSD our export stage trained, on its golden images and on them tiled 2x2 into a 768x572 frame."""
    engine = InferenceEngine.load(test_bundle, providers=["cpu"], skip_unneeded_models=False)
    ssd = engine._kinds["ssd"]  # the kind that owns the SSD's post-processing
    captured: list[tuple[dict[str, np.ndarray], Layout]] = []
    original = ssd.outputs

    def capture(tensors: dict[str, np.ndarray], unit: np.ndarray, layout: Layout) -> object:
        captured.append(({k: v.copy() for k, v in tensors.items()}, layout))
        return original(tensors, unit, layout)

    ssd.outputs = capture  # type: ignore[method-assign]
    golden = [read_image(test_bundle / g.file.path) for g in engine.manifest.golden]
    images = golden + [np.block([[a, b], [b, a]]) for a, b in itertools.pairwise(golden)]
    assert len(images) >= 3
    compared = 0
    try:
        for image in images:
            out = engine.analyze(image).models["ssd"]
            tensors, layout = captured[-1]
            ref = reference_detections(
                tensors["class_probs"],
                tensors["box_deltas"],
                ssd.anchors,
                ssd.post,
                layout,
                ssd.spec.preprocessing.input_size,
            )
            _assert_same((out.boxes, out.scores), ref)
            assert out.image_hw == image.shape[:2]  # what a calibrated box scale clips to
            compared += len(ref[1])
    finally:
        engine.close()
    assert compared > 0


def test_non_finite_heads_give_the_reference_detections() -> None:
    """A GPU fp16 engine can overflow: NaN scores are never candidates, inf/NaN deltas never reported."""
    rng = np.random.default_rng(11)
    anchors = _anchors(rng, 900, 128)
    post = SSDPost(anchors={"path": "anchors.npy", "sha256": "0" * 64})
    layout = _layout(12, 128)
    probs, deltas = _heads(rng, 12, 900)
    probs[rng.random(probs.shape[:2]) < 0.02, 1] = np.nan
    deltas[rng.random(deltas.shape[:2]) < 0.02, 2] = np.inf
    deltas[rng.random(deltas.shape[:2]) < 0.02, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and quietly: a daemon's log must not fill with numpy warnings
        boxes, scores = ssd_detections(probs, deltas, anchors, post, layout, (128, 128))
    _assert_same((boxes, scores), reference_detections(probs, deltas, anchors, post, layout, (128, 128)))
    assert np.all(np.isfinite(boxes)) and np.all(np.isfinite(scores)) and len(scores) > 0


def test_grown_boxes_keep_their_centre_and_stay_inside_the_image() -> None:
    boxes = np.asarray([[10, 20, 30, 60], [0, 0, 10, 10], [180, 80, 200, 100]], np.float32)
    out = grown(boxes, 1.5, (100, 200))  # 100 rows, 200 columns
    assert out[0].tolist() == [5.0, 10.0, 35.0, 70.0]
    assert out[1].tolist() == [0.0, 0.0, 12.5, 12.5]  # clipped at the image's top-left corner
    assert out[2].tolist() == [175.0, 75.0, 200.0, 100.0]  # and at its bottom-right one: x by width, y by height
    assert grown(boxes, 1.0, (100, 200)) is boxes


def test_the_device_reports_the_scaled_boxes_above_the_threshold() -> None:
    out = SSDOutput(
        score=0.9,
        boxes=np.asarray([[10, 10, 20, 20], [50, 50, 70, 70]], np.float32),
        scores=np.asarray([0.9, 0.3], np.float32),
        image_hw=(64, 64),
    )
    boxes, scores = SSD.boxes(out, SSDThresholds(image=0.5, box=0.5, box_scale=1.2))
    assert boxes.tolist() == [[9.0, 9.0, 21.0, 21.0]]
    assert scores.tolist() == [pytest.approx(0.9)]
    with pytest.raises(ValueError, match="box_scale"):
        SSDThresholds(image=0.5, box=0.5, box_scale=3.0)
