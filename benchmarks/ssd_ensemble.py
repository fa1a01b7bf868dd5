"""SSD bundles fused per image, and the box threshold: what an ensemble of runs would give, without training.

Each bundle's SSD runs through the agent's engine on the validation and test series (every detection above
its score floor). Per image, the bundles' boxes are fused by weighted box fusion (boxes of the same defect,
IoU > 0.55, averaged by score; the fused score is the sum over bundles / number of bundles), so a single
bundle passes through nearly unchanged. The box threshold is chosen on the validation series by the study's
avg F1 over a fine grid (0.04-0.49 in 0.01 steps, where `build` uses quantiles of the scores) and applied to
the test series; the test series' own best threshold is printed as an upper bound, not a result.

Run in the export environment:
`OMP_NUM_THREADS=1 python benchmarks/ssd_ensemble.py --data ../shared/data/gdxray --bundles B1,B2,B3 [--each]`.
"""

from __future__ import annotations

import argparse
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lineside.agent.inference.engine import InferenceEngine
from lineside.export import metrics
from lineside.export.data import datasets_for
from lineside.export.data.base import Sample
from lineside.export.models.base import ground_truth

GRID = np.round(np.arange(0.04, 0.50, 0.01), 2)
FLOOR = 0.03  # boxes below never enter the fusion (the lowest box threshold any bundle calibrated is 0.06)


@dataclass
class Detections:
    boxes: np.ndarray  # (K, 4) x1, y1, x2, y2 in original pixels
    scores: np.ndarray  # (K,)


def detect(bundle: Path, samples: list[Sample]) -> list[Detections]:
    engine = InferenceEngine.load(bundle, providers=["cpu"])
    try:
        out = []
        for s in samples:
            ssd = engine.analyze(s.load()).models["ssd"]
            out.append(Detections(ssd.boxes, ssd.scores))  # type: ignore[attr-defined]
        return out
    finally:
        engine.close()


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area - inter, 1e-9)


def fuse(per_bundle: list[Detections], iou: float = 0.55) -> Detections:
    """Weighted box fusion of one image's detections from several bundles."""
    boxes = np.concatenate([d.boxes for d in per_bundle]).reshape(-1, 4)
    scores = np.concatenate([d.scores for d in per_bundle])
    keep = scores > FLOOR
    boxes, scores = boxes[keep], scores[keep]
    fused: list[np.ndarray] = []
    members: list[list[int]] = []
    for i in np.argsort(-scores):
        for k, box in enumerate(fused):
            if _iou(box, boxes[i][None])[0] > iou:
                members[k].append(int(i))
                w = scores[members[k]]
                fused[k] = (boxes[members[k]] * w[:, None]).sum(0) / w.sum()
                break
        else:
            fused.append(boxes[i].astype(np.float64))
            members.append([int(i)])
    out_boxes = np.asarray(fused, np.float32).reshape(-1, 4)
    out_scores = np.asarray([scores[m].sum() / len(per_bundle) for m in members], np.float32)
    return Detections(out_boxes, out_scores)


def evals(samples: list[Sample], dets: list[Detections]) -> list[metrics.ImageEval]:
    out = []
    for s, d in zip(samples, dets, strict=True):
        shape = s.load().shape[:2]
        best = float(d.scores.max()) if d.scores.size else 0.0
        out.append(metrics.ImageEval(s.name, ground_truth(s), d.boxes, d.scores, shape, bool(s.label), True, best))
    return out


def report(name: str, val: list[metrics.ImageEval], test: list[metrics.ImageEval], groups: list[str]) -> None:
    on_val = [metrics.study_table(val, score_threshold=float(t)).avg_f1 for t in GRID]
    chosen = float(GRID[int(np.argmax(on_val))])
    table = metrics.study_table(test, score_threshold=chosen)
    on_test = [metrics.study_table(test, score_threshold=float(t)).avg_f1 for t in GRID]
    print(
        f"{name}: validation picks {chosen:.2f} (avg F1 {max(on_val):.3f}); test avg F1 {table.avg_f1:.3f}, "
        f"avg IoU {table.avg_iou:.3f}, AP50 {metrics.average_precision(test):.3f}; test's own best "
        f"{max(on_test):.3f} at {float(GRID[int(np.argmax(on_test))]):.2f}"
    )
    per = []
    for g in sorted(set(groups)):
        mine = [e for e, h in zip(test, groups, strict=True) if h == g]
        if any(e.has_defects for e in mine):
            per.append(f"{g} {metrics.study_table(mine, score_threshold=chosen).avg_f1:.3f}")
    print("  test avg F1 per series: " + ", ".join(per))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", help="split JSON (default: the dataset's series-disjoint default split)")
    p.add_argument("--bundles", required=True, help="comma-separated bundle folders, each with an SSD")
    p.add_argument("--each", action="store_true", help="also report every bundle alone (through the same fusion)")
    args = p.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, python {sys.version.split()[0]}")
    _, _train, val, test, _ = datasets_for(args.data, args.split)
    val_s = [s for s in val.samples if s.annotated]
    test_s = [s for s in test.samples if s.annotated]
    bundles = [Path(b) for b in args.bundles.split(",")]
    found = {b: (detect(b, val_s), detect(b, test_s)) for b in bundles}
    groups = [s.group for s in test_s]
    if args.each:
        for b, (v, t) in found.items():
            report(b.as_posix(), evals(val_s, [fuse([d]) for d in v]), evals(test_s, [fuse([d]) for d in t]), groups)
    v_fused = [fuse([found[b][0][i] for b in bundles]) for i in range(len(val_s))]
    t_fused = [fuse([found[b][1][i] for b in bundles]) for i in range(len(test_s))]
    report(f"fused ({len(bundles)} bundles)", evals(val_s, v_fused), evals(test_s, t_fused), groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
