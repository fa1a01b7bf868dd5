"""The bundle's SSD run at other input scales, and at several merged by NMS, without retraining: each
calibrated on the validation series (box threshold by avg F1, as `build` does for the SSD) and scored on
the test series, pooled and per series.

Run in the export environment:
`python benchmarks/ssd_scales.py --bundle B --data ../shared/data/gdxray --scales 1.0,0.5,1.0+0.5`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.preprocess import BatchBuilder, layout_for, windowed
from lineside.agent.inference.types import ModelOutputs
from lineside.agent.models.ssd import SSDOutput, nms, ssd_detections
from lineside.export import metrics
from lineside.export.data import datasets_for
from lineside.export.models import EXPORT_KINDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle with an SSD")
    parser.add_argument("--data", required=True, help="the data set (its default split: val calibrates, test scores)")
    parser.add_argument("--scales", default="1.0,0.5,1.0+0.5", help="comma-separated; '+' merges scales")
    args = parser.parse_args(argv)
    _, _train, val, test, _split = datasets_for(args.data, None)
    engine = InferenceEngine.load(args.bundle, providers=["cpu"], skip_unneeded_models=False)
    spec = engine.manifest.models["ssd"]
    runner, ssd = engine._runners["ssd"], engine._kinds["ssd"]  # the engine's own session and decode
    data = {name: [s for s in ds.samples if s.annotated] for name, ds in (("val", val), ("test", test))}
    images = {name: [s.load() for s in samples] for name, samples in data.items()}
    cache: dict[tuple[str, int, float], tuple[np.ndarray, np.ndarray]] = {}

    def detections(split: str, i: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
        if (split, i, scale) not in cache:
            image = images[split][i]
            prep = spec.preprocessing.model_copy(update={"scale": scale})
            layout = layout_for(image.shape, prep)
            tensors = runner.run(BatchBuilder(prep).build(windowed(image, prep), layout))
            cache[split, i, scale] = ssd_detections(
                tensors["class_probs"], tensors["box_deltas"], ssd.anchors, ssd.post, layout, prep.input_size
            )
        return cache[split, i, scale]

    kind = EXPORT_KINDS["ssd"]
    groups = np.asarray([s.group for s in data["test"]])
    for spec_scales in args.scales.split(","):
        scales = [float(x) for x in spec_scales.split("+")]
        outputs: dict[str, list[ModelOutputs]] = {}
        for split in data:
            outputs[split] = []
            for i, image in enumerate(images[split]):
                found = [detections(split, i, s) for s in scales]
                boxes = np.concatenate([f[0] for f in found])
                scores = np.concatenate([f[1] for f in found])
                if len(scales) > 1 and scores.size:
                    keep = nms(boxes, scores, ssd.post.nms_iou, ssd.post.max_detections)
                    boxes, scores = boxes[keep], scores[keep]
                out = SSDOutput(score=float(scores.max()) if scores.size else 0.0, boxes=boxes, scores=scores)
                outputs[split].append(ModelOutputs(image.shape[0], image.shape[1], {"ssd": out}))
        thresholds, _figures = kind.calibrate(outputs["val"], data["val"])
        ev = kind.evaluate(outputs["test"], data["test"], thresholds)
        auroc = {
            split: metrics.auroc([o.models["ssd"].score for o in outputs[split]], [bool(s.label) for s in data[split]])
            for split in data
        }
        per = {}
        for group in sorted(set(groups.tolist())):
            at = [g == group for g in groups]
            sub = kind.evaluate(
                [o for o, here in zip(outputs["test"], at, strict=True) if here],
                [s for s, here in zip(data["test"], at, strict=True) if here],
                thresholds,
            )
            per[group] = round(sub["study"]["avg_f1"], 3)
        print(
            f"scales {spec_scales:<14} AUROC val {auroc['val']:.3f} test {auroc['test']:.3f} | test avg F1 "
            f"{ev['study']['avg_f1']:.3f} avg IoU {ev['study']['avg_iou']:.3f} AP50 {ev['ap50']:.3f} "
            f"R@.25 {ev['box']['iou25']['recall']:.3f} | avg F1 per series {per}",
            flush=True,
        )
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
