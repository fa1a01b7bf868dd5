"""Ways to fuse the models' image scores, on one bundle: ranking (AUROC) on validation and test series, and
what an operating point set on validation for a target recall gives on test.

The bundle's own rule is "any model fires" at equal false-alarm levels on normal validation images
(`export/calibrate.py`); this compares it with soft fusions that add the evidence up instead:
the mean of z-scores against normal validation images, the sum of log-odds, the product of
probabilities. The point is the lever table in docs/evaluation.md: which fusion ranks better, and
whether an operating point chosen on validation transfers to unseen series.

Run in the export environment:
`python benchmarks/decision_fusion.py --bundle B --data ../shared/data/gdxray [--models classifier,ssd]`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lineside.agent.inference.engine import InferenceEngine
from lineside.export import metrics
from lineside.export.data import datasets_for
from lineside.export.data.base import Dataset

Scores = dict[str, np.ndarray]


def image_scores(engine: InferenceEngine, ds: Dataset) -> tuple[Scores, np.ndarray]:
    """Every model's image score on every annotated image, and the labels."""
    samples = [s for s in ds.samples if s.annotated]
    outputs = [engine.analyze(s.load()) for s in samples]
    scores = {kind: np.asarray([o.models[kind].score for o in outputs]) for kind in engine.manifest.models}
    return scores, np.asarray([bool(s.label) for s in samples])


def fusions(val: Scores, val_labels: np.ndarray, models: list[str]) -> dict[str, Callable[[Scores], np.ndarray]]:
    """Fused scores (higher = more defective), each normalised with validation statistics only."""
    normal = ~val_labels

    def rarity(scores: Scores, kind: str) -> np.ndarray:  # 1 - share of normal validation images scoring >= it
        ref = np.sort(val[kind][normal])
        return np.searchsorted(ref, scores[kind], side="left") / ref.size

    def z(scores: Scores, kind: str) -> np.ndarray:
        ref = val[kind][normal]
        return (scores[kind] - ref.mean()) / (ref.std() + 1e-9)

    def logit(scores: Scores, kind: str) -> np.ndarray:
        p = np.clip(scores[kind], 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p))

    out: dict[str, Callable[[Scores], np.ndarray]] = {f"{kind} alone": (lambda s, k=kind: s[k]) for kind in models}
    out["any fires (the bundle's rule)"] = lambda s: np.max([rarity(s, k) for k in models], axis=0)
    out["mean of z-scores"] = lambda s: np.mean([z(s, k) for k in models], axis=0)
    if all(np.all((val[k] >= 0) & (val[k] <= 1)) for k in models):  # probabilities only
        out["sum of log-odds"] = lambda s: np.sum([logit(s, k) for k in models], axis=0)
        out["product of probabilities"] = lambda s: np.prod([s[k] for k in models], axis=0)
    return out


def operating_point(val: np.ndarray, val_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, target: float):
    """Threshold reaching `target` recall on validation -> (val recall, val FA, test recall, test FA, test F1)."""
    positives = np.sort(val[val_labels])[::-1]
    threshold = positives[int(np.ceil(target * positives.size)) - 1]
    on_val, on_test = val >= threshold, test >= threshold
    return (
        float(np.mean(on_val[val_labels])),
        float(np.mean(on_val[~val_labels])),
        float(np.mean(on_test[test_labels])),
        float(np.mean(on_test[~test_labels])),
        metrics.image_level(test_labels, on_test)["f1"],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", required=True, help="the data set (its default split: val and test)")
    parser.add_argument("--models", default="classifier,ssd", help="models to fuse (comma-separated)")
    parser.add_argument("--target-recall", type=float, default=0.98)
    args = parser.parse_args(argv)
    _, _train, val_ds, test_ds, _split = datasets_for(args.data, None)
    engine = InferenceEngine.load(args.bundle, providers=["cpu"], skip_unneeded_models=False)
    try:
        val, val_labels = image_scores(engine, val_ds)
        test, test_labels = image_scores(engine, test_ds)
    finally:
        engine.close()
    models = args.models.split(",")
    print(f"val {val_labels.size} images ({val_labels.sum()} defective), test {test_labels.size} ({test_labels.sum()})")
    print(
        f"{'fusion':<30}{'AUROC val':>10}{'test':>7}   at recall {args.target_recall} on val: "
        "val recall / FA -> test recall / FA / F1   (best test F1 at any threshold)"
    )
    for name, fuse in fusions(val, val_labels, models).items():
        fv, ft = fuse(val), fuse(test)
        rv, fav, rt, fat, f1 = operating_point(fv, val_labels, ft, test_labels, args.target_recall)
        best = max(metrics.image_level(test_labels, ft >= t)["f1"] for t in np.unique(ft))
        print(
            f"{name:<30}{metrics.auroc(fv, val_labels):>10.3f}{metrics.auroc(ft, test_labels):>7.3f}   "
            f"{rv:.3f} / {fav:.3f} -> {rt:.3f} / {fat:.3f} / {f1:.3f}   ({best:.3f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
