"""Test-time augmentation for the SSD: the frame mirrored, run again, and the passes' boxes fused.

A radiograph mirrored left-right or top-bottom is as plausible as the original, so each pass is another
look at the same defects, and the average of the passes' boxes may sit closer to the annotated one (at
IoU 0.5 a 22 px defect leaves a few pixels of room). Each pass runs the bundle's SSD through the agent's
engine (every detection above its score floor); its boxes are mapped back to the frame and the passes are
fused per image by weighted box fusion (`ssd_ensemble.fuse`: IoU > 0.55, score = sum over passes / number
of passes). Every pass set, the single pass included, is then calibrated on the validation series as
`build` calibrates an SSD-only bundle (box threshold and box scale by the study's avg F1; the image decision
at the recall target, 0.98, with the fewest false alarms) and scored on the test series as `evaluate` scores
it (boxes only on flagged images). So the single pass `id` reproduces `evaluate` of that bundle.

Run in the export environment, on an SSD-only bundle (`benchmarks/build_eval.sh` builds one):
`OMP_NUM_THREADS=1 python benchmarks/ssd_tta.py --data ../shared/data/gdxray --bundle B --sets id,id+h,id+h+v`.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from ssd_ensemble import Detections, fuse

from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.types import ModelOutputs
from lineside.agent.models.ssd import SSDOutput
from lineside.export import metrics
from lineside.export.calibrate import operating_point
from lineside.export.data import datasets_for
from lineside.export.data.base import Sample
from lineside.export.models import EXPORT_KINDS

FLIPS = {"id": (False, False), "h": (True, False), "v": (False, True), "hv": (True, True)}


def flipped(image: np.ndarray, h: bool, v: bool) -> np.ndarray:
    out = image[:, ::-1] if h else image
    return np.ascontiguousarray(out[::-1] if v else out)


def unflip(boxes: np.ndarray, shape: tuple[int, int], h: bool, v: bool) -> np.ndarray:
    """Boxes found on the mirrored frame, in the original frame's pixels (a pixel x becomes W - x)."""
    out = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    if h:
        out[:, [0, 2]] = shape[1] - out[:, [2, 0]]
    if v:
        out[:, [1, 3]] = shape[0] - out[:, [3, 1]]
    return out


def passes(
    engine: InferenceEngine, samples: list[Sample], names: list[str]
) -> tuple[dict[str, list[Detections]], list[tuple[int, int]]]:
    """Each pass's detections per image, in the frame's pixels, and each image's (height, width)."""
    out: dict[str, list[Detections]] = {n: [] for n in names}
    shapes: list[tuple[int, int]] = []
    for s in samples:
        image = s.load()
        shapes.append(image.shape[:2])
        for n in names:
            h, v = FLIPS[n]
            ssd = engine.analyze(flipped(image, h, v)).models["ssd"]
            out[n].append(Detections(unflip(ssd.boxes, image.shape[:2], h, v), ssd.scores))  # type: ignore[attr-defined]
    return out, shapes


def as_outputs(shapes: list[tuple[int, int]], dets: list[Detections]) -> list[ModelOutputs]:
    out = []
    for hw, d in zip(shapes, dets, strict=True):
        ssd = SSDOutput(
            score=float(d.scores.max()) if d.scores.size else 0.0, boxes=d.boxes, scores=d.scores, image_hw=hw
        )
        out.append(ModelOutputs(hw[0], hw[1], {"ssd": ssd}))
    return out


def report(
    name: str, val: tuple[list[Sample], list[ModelOutputs]], test: tuple[list[Sample], list[ModelOutputs]]
) -> None:
    kind = EXPORT_KINDS["ssd"]
    (val_s, val_o), (test_s, test_o) = val, test
    thresholds, figures = kind.calibrate(val_o, val_s)
    labels = np.asarray([bool(s.label) for s in val_s])
    point = operating_point({"ssd": np.asarray([o.models["ssd"].score for o in val_o])}, labels, ["ssd"], 0.98)
    thresholds = thresholds.model_copy(update={"image": point.thresholds["ssd"]})
    ev = kind.evaluate(test_o, test_s, thresholds)
    scores = [o.models["ssd"].score for o in test_o]
    test_labels = [bool(s.label) for s in test_s]
    image = metrics.image_level(test_labels, [sc >= thresholds.image for sc in scores])
    per = []
    for g in sorted({s.group for s in test_s}):
        at = [s.group == g for s in test_s]
        sub = kind.evaluate(
            [o for o, here in zip(test_o, at, strict=True) if here],
            [s for s, here in zip(test_s, at, strict=True) if here],
            thresholds,
        )
        if sub["study"]["avg_f1"] is not None:
            per.append(f"{g} {100 * sub['study']['avg_f1']:.1f}")
    print(
        f"{name:<10} val: box thr {thresholds.box:.3f} scale {thresholds.box_scale:g}, avg F1 "
        f"{figures['avg_f1_defective_images']:.3f} | test: avg F1 {ev['study']['avg_f1']:.3f} avg IoU "
        f"{ev['study']['avg_iou']:.3f} AP50 {ev['ap50']:.3f} R@.25 {ev['box']['iou25']['recall']:.3f} | image F1 "
        f"{image['f1']:.3f} (R {image['recall']:.3f}) AUROC {metrics.auroc(scores, test_labels):.3f}",
        flush=True,
    )
    print("           test avg F1 per series: " + ", ".join(per), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", help="split JSON (default: the dataset's series-disjoint default split)")
    p.add_argument("--bundle", required=True, help="bundle folder with an SSD (SSD-only: faster)")
    p.add_argument("--sets", default="id,id+h,id+h+v,id+h+v+hv", help="pass sets to compare, '+' joins passes")
    args = p.parse_args(argv)
    sets = [s.split("+") for s in args.sets.split(",")]
    unknown = {n for s in sets for n in s} - set(FLIPS)
    if unknown:
        p.error(f"unknown pass(es) {sorted(unknown)}; known: {sorted(FLIPS)}")
    names = sorted({n for s in sets for n in s}, key=list(FLIPS).index)
    print(f"{platform.processor() or platform.machine()}, python {sys.version.split()[0]}, bundle {args.bundle}")
    _, _train, val, test, _ = datasets_for(args.data, args.split)
    val_s = [s for s in val.samples if s.annotated]
    test_s = [s for s in test.samples if s.annotated]
    engine = InferenceEngine.load(Path(args.bundle), providers=["cpu"])
    try:
        t0 = time.perf_counter()
        (val_p, val_hw), (test_p, test_hw) = passes(engine, val_s, names), passes(engine, test_s, names)
        per_pass_ms = (time.perf_counter() - t0) * 1000 / ((len(val_s) + len(test_s)) * len(names))
    finally:
        engine.close()
    print(f"{len(val_s)} validation, {len(test_s)} test images; {per_pass_ms:.0f} ms per pass (whole bundle, CPU)")
    for s in sets:
        # one pass stays as the engine gave it (exactly what `evaluate` scores); several are fused
        val_f = [fuse([val_p[n][i] for n in s]) if len(s) > 1 else val_p[s[0]][i] for i in range(len(val_s))]
        test_f = [fuse([test_p[n][i] for n in s]) if len(s) > 1 else test_p[s[0]][i] for i in range(len(test_s))]
        report("+".join(s), (val_s, as_outputs(val_hw, val_f)), (test_s, as_outputs(test_hw, test_f)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
