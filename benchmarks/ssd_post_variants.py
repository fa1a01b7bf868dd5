"""What is done with an SSD's detections after NMS, without retraining: each variant applied to every
detection of the validation and test series, then calibrated on validation as `build` calibrates the
SSD (box threshold and box scale by avg F1; boxes reported on the images the bundle's operating point
flags) and scored on the test series, pooled and per series, for each bundle given. So `none` is what
`build` gives, and `scale:S` grows the boxes by S on top of the calibrated scale (`--box-scales 1.0`:
calibration keeps the boxes as they are, as before build calibrated a scale).

Variants: `none`; `contain:C` (a box is dropped when a better-scored box covers more than C of the
smaller one's area: fragments of one large defect, a box inside a box); `merge:C` (boxes overlapping by
more than C of the smaller one's area become their union, with the best score); `scale:S` (every box
grown by S about its centre); `relative:A` (only boxes scoring at least A times the image's best).
`+` chains them, e.g. `contain:0.6+scale:1.2`.

Run in the export environment:
`python benchmarks/ssd_post_variants.py --bundles B1,B2 --data ../shared/data/gdxray --variants none,contain:0.6`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.types import ModelOutputs
from lineside.agent.models.ssd import SSDOutput, grown
from lineside.export.data import datasets_for
from lineside.export.data.base import Sample
from lineside.export.models import EXPORT_KINDS

Boxes = tuple[np.ndarray, np.ndarray]


def _cover(boxes: np.ndarray) -> np.ndarray:
    """cover[i, j] = intersection of boxes i and j over the smaller one's area."""
    x1 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y1 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x2 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y2 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(np.minimum(area[:, None], area[None, :]), 1e-6)


def contain(c: float) -> Callable[[np.ndarray, np.ndarray], Boxes]:
    def run(boxes: np.ndarray, scores: np.ndarray) -> Boxes:
        if len(boxes) < 2:
            return boxes, scores
        order = np.argsort(-scores, kind="stable")
        boxes, scores = boxes[order], scores[order]
        cover = _cover(boxes)
        keep: list[int] = []
        for i in range(len(boxes)):
            if not any(cover[i, k] > c for k in keep):
                keep.append(i)
        return boxes[keep], scores[keep]

    return run


def merge(c: float) -> Callable[[np.ndarray, np.ndarray], Boxes]:
    def run(boxes: np.ndarray, scores: np.ndarray) -> Boxes:
        if len(boxes) < 2:
            return boxes, scores
        order = np.argsort(-scores, kind="stable")
        boxes, scores = boxes[order].copy(), scores[order]
        cover = _cover(boxes)
        owner = -np.ones(len(boxes), int)
        for i in range(len(boxes)):  # each box joins the best-scored cluster head it overlaps
            heads = [k for k in range(i) if owner[k] == k and cover[i, k] > c]
            owner[i] = heads[0] if heads else i
        out = []
        for h in np.flatnonzero(owner == np.arange(len(boxes))):
            members = boxes[owner == h]
            out.append([members[:, 0].min(), members[:, 1].min(), members[:, 2].max(), members[:, 3].max()])
        heads = owner == np.arange(len(boxes))
        return np.asarray(out, np.float32), scores[heads]

    return run


def scale(s: float) -> Callable[[np.ndarray, np.ndarray], Boxes]:
    def run(boxes: np.ndarray, scores: np.ndarray) -> Boxes:
        return grown(boxes, s, None), scores  # build's box scale, clipped to the image where it is reported

    return run


def relative(a: float) -> Callable[[np.ndarray, np.ndarray], Boxes]:
    def run(boxes: np.ndarray, scores: np.ndarray) -> Boxes:
        if not len(scores):
            return boxes, scores
        keep = scores >= a * scores.max()
        return boxes[keep], scores[keep]

    return run


STEPS = {"contain": contain, "merge": merge, "scale": scale, "relative": relative}


def variant(spec: str) -> Callable[[np.ndarray, np.ndarray], Boxes]:
    steps = [] if spec == "none" else [STEPS[name](float(v)) for name, v in (s.split(":") for s in spec.split("+"))]

    def run(boxes: np.ndarray, scores: np.ndarray) -> Boxes:
        for step in steps:
            boxes, scores = step(boxes, scores)
        return boxes, scores

    return run


def detections(bundle: Path, samples: dict[str, list[Sample]]) -> tuple[dict[str, list[ModelOutputs]], float]:
    """Each image's outputs through the agent's engine, and the bundle's image threshold for the SSD."""
    engine = InferenceEngine.load(bundle, providers=["cpu"], skip_unneeded_models=False)
    try:
        found = {split: [engine.analyze(s.load()) for s in items] for split, items in samples.items()}
        return found, engine.manifest.models["ssd"].thresholds.image
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", required=True, help="comma-separated bundles with an SSD")
    parser.add_argument("--data", required=True, help="the data set (its default split: val calibrates, test scores)")
    parser.add_argument("--variants", default="none,contain:0.6,merge:0.6,scale:1.2", help="comma-separated")
    parser.add_argument(
        "--box-scales", help="comma-separated scales calibration may pick (default: build's); 1.0: none"
    )
    args = parser.parse_args(argv)
    _, _train, val, test, _split = datasets_for(args.data, None)
    samples = {name: [s for s in ds.samples if s.annotated] for name, ds in (("val", val), ("test", test))}
    kind = EXPORT_KINDS["ssd"]
    if args.box_scales:
        kind.box_scales = tuple(float(v) for v in args.box_scales.split(","))  # type: ignore[attr-defined]
    groups = [s.group for s in samples["test"]]
    table: dict[str, list[float]] = {}
    for bundle in args.bundles.split(","):
        found, image_threshold = detections(Path(bundle), samples)
        for spec in args.variants.split(","):
            post = variant(spec)
            outputs: dict[str, list[ModelOutputs]] = {}
            for split, rows in found.items():
                outputs[split] = []
                for o in rows:
                    ssd = o.models["ssd"]
                    b, sc = post(ssd.boxes, ssd.scores)  # type: ignore[attr-defined]
                    out = SSDOutput(
                        score=float(sc.max()) if sc.size else 0.0, boxes=b, scores=sc, image_hw=(o.height, o.width)
                    )
                    outputs[split].append(ModelOutputs(o.height, o.width, {"ssd": out}))
            thresholds, figures = kind.calibrate(outputs["val"], samples["val"])
            # Boxes are reported on the images the bundle's operating point flags, as `evaluate` scores them.
            thresholds = thresholds.model_copy(update={"image": image_threshold})
            ev = kind.evaluate(outputs["test"], samples["test"], thresholds)
            per = {}
            for group in sorted(set(groups)):
                at = [g == group for g in groups]
                sub = kind.evaluate(
                    [o for o, here in zip(outputs["test"], at, strict=True) if here],
                    [s for s, here in zip(samples["test"], at, strict=True) if here],
                    thresholds,
                )
                per[group] = round(100 * sub["study"]["avg_f1"], 1)
            table.setdefault(spec, []).append(ev["study"]["avg_f1"])
            study, name = ev["study"], Path(bundle).parent.parent.name
            print(
                f"{name:<12} {spec:<22} val avg F1 {figures['avg_f1_defective_images']:.3f} box thr "
                f"{thresholds.box:.3f} scale {thresholds.box_scale:g} | test avg F1 {study['avg_f1']:.3f} avg IoU "
                f"{study['avg_iou']:.3f} AP50 {ev['ap50']:.3f} R@.25 {ev['box']['iou25']['recall']:.3f} | {per}",
                flush=True,
            )
    if len(args.bundles.split(",")) > 1:
        for spec, f1s in table.items():
            each = ", ".join(f"{f:.3f}" for f in f1s)
            print(f"mean over bundles  {spec:<22} test avg F1 {np.mean(f1s):.3f}  ({each})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
