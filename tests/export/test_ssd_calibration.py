"""The SSD's calibration: box threshold and box scale chosen by avg F1 on the validation images."""

from __future__ import annotations

import numpy as np
import pytest

from lineside.agent.inference.types import ModelOutputs
from lineside.agent.models.ssd import SSDOutput, SSDThresholds
from lineside.export.data.base import Box, Sample

pytestmark = pytest.mark.export


def _validation_set(shrink: float, n: int = 12) -> tuple[list[ModelOutputs], list[Sample]]:
    """n defective images, one 30 px defect each, detected at its centre with a box `shrink` times its size,
    plus a low-scored false box elsewhere; and 4 defect-free images with a weak false box."""
    rng = np.random.default_rng(3)
    outputs, samples = [], []
    for i in range(n):
        cx, cy = rng.uniform(60, 440, size=2)
        gt = Box(cx - 15, cy - 15, cx + 15, cy + 15)
        half = 15 * shrink
        found = np.asarray([[cx - half, cy - half, cx + half, cy + half], [5, 5, 25, 25]], np.float32)
        scores = np.asarray([0.9, 0.2], np.float32)
        out = SSDOutput(score=0.9, boxes=found, scores=scores, image_hw=(500, 500))
        outputs.append(ModelOutputs(500, 500, {"ssd": out}))
        samples.append(Sample(f"mem://{i}", "A", (gt,), True, True, f"d{i}"))
    for i in range(4):
        out = SSDOutput(score=0.1, boxes=np.asarray([[5, 5, 25, 25]], np.float32), scores=np.asarray([0.1], np.float32))
        outputs.append(ModelOutputs(500, 500, {"ssd": out}))
        samples.append(Sample(f"mem://n{i}", "A", (), True, False, f"n{i}"))
    return outputs, samples


def test_boxes_drawn_larger_than_the_detector_finds_them_get_a_box_scale() -> None:
    from lineside.export.models import EXPORT_KINDS

    # given a detector whose boxes are 0.6 of the annotated size: IoU 0.36, every one a miss at 0.5
    outputs, samples = _validation_set(shrink=0.6)

    # when calibrated
    th, figures = EXPORT_KINDS["ssd"].calibrate(outputs, samples)

    # then the scale that brings them over IoU 0.5 is chosen, and the false boxes stay below the threshold
    assert isinstance(th, SSDThresholds)
    assert th.box_scale == 1.2  # the smallest that does: (0.6 x 1.2)^2 = 0.52
    assert 0.2 < th.box <= 0.9
    assert figures["box_scale"] == th.box_scale
    assert figures["avg_f1_by_box_scale"]["1"] == 0.0
    assert figures["avg_f1_defective_images"] == pytest.approx(1.0)


def test_boxes_drawn_as_the_detector_finds_them_keep_their_size() -> None:
    from lineside.export.models import EXPORT_KINDS

    outputs, samples = _validation_set(shrink=1.0)
    th, figures = EXPORT_KINDS["ssd"].calibrate(outputs, samples)
    # several scales keep IoU >= 0.5 here: the tie goes to the smallest, the boxes as found
    assert th.box_scale == 1.0
    assert figures["avg_f1_defective_images"] == pytest.approx(1.0)
