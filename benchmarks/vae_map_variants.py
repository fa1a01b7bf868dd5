"""The VAE anomaly map's levers, on one trained VAE: each variant calibrated on the validation series and
evaluated on the test series exactly as `build` and `evaluate` do for the bundle's own map.

The reconstructions are computed once through the bundle's ONNX model (the agent's engine); each
variant only changes what is made of the residual. Variants (the study's recipe is `current`):

- `current`      squared residual, part mask, L2 normalisation, x original (contrast), blur
- `no-contrast`  without the x original step
- `brighter`     only where the input is brighter than the reconstruction (a void lets more through)
- `darker`       only where it is darker
- `edge-norm`    residual divided by the local gradient energy (edges reconstruct worst on good parts too)
- `dog`          residual minus its wide blur (a blob filter: keeps defect-sized peaks)
- combinations of the above (`brighter-edge`, `brighter-dog`, `darker-dog`)

Run in the export environment:
`python benchmarks/vae_map_variants.py --bundle B --data ../shared/data/gdxray [--variants current,dog]`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.preprocess import Layout, layout_for, scaled_unit, windowed
from lineside.agent.inference.types import ModelOutputs
from lineside.agent.models.part_mask import NoPartError, part_mask
from lineside.agent.models.vae import VAEOutput, VAEPost, image_score_from_map
from lineside.export import metrics
from lineside.export.data import datasets_for
from lineside.export.data.base import Sample
from lineside.export.models import EXPORT_KINDS

Residual = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (reconstruction, input) -> per-pixel residual


def squared(recon: np.ndarray, unit: np.ndarray) -> np.ndarray:
    return (recon - unit) ** 2


def brighter(recon: np.ndarray, unit: np.ndarray) -> np.ndarray:
    return np.maximum(unit - recon, 0) ** 2


def darker(recon: np.ndarray, unit: np.ndarray) -> np.ndarray:
    return np.maximum(recon - unit, 0) ** 2


def stitch(scaled: np.ndarray, recon: np.ndarray, layout: Layout, tile: tuple[int, int], border: int, fn: Residual):
    """Per-tile residuals stitched by maximum, tile borders ignored (as agent.models.vae does)."""
    sh, sw = scaled.shape
    out = np.zeros((sh, sw), np.float32)
    for i, (y, x) in enumerate(layout.origins):
        ch, cw = min(tile[0], sh - y), min(tile[1], sw - x)
        value = fn(recon[i, 0, :ch, :cw], scaled[y : y + ch, x : x + cw])
        region = out[y + border : y + ch - border, x + border : x + cw - border]
        np.maximum(region, value[border : ch - border, border : cw - border], out=region)
    return out


def edge_normalised(scaled: np.ndarray, residual: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    gx = cv2.Sobel(scaled, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(scaled, cv2.CV_32F, 0, 1, ksize=3)
    energy = cv2.GaussianBlur(gx * gx + gy * gy, (0, 0), sigma)
    return residual / (energy + float(np.median(energy)) + 1e-8)


def blob_filter(residual: np.ndarray, small: float = 2.0, large: float = 8.0) -> np.ndarray:
    return np.maximum(cv2.GaussianBlur(residual, (0, 0), small) - cv2.GaussianBlur(residual, (0, 0), large), 0)


def finish(residual: np.ndarray, scaled: np.ndarray, layout: Layout, post: VAEPost, *, contrast: bool, blur: bool):
    """Part mask -> L2 normalisation -> (x original) -> (blur) -> original pixels, as the agent does."""
    with contextlib.suppress(NoPartError):
        residual = residual * part_mask(scaled, erode=post.mask_erode)
    norm = float(np.sqrt(np.sum(residual.astype(np.float64) ** 2) / residual.size))
    amap = residual / max(norm, 1e-12)
    if contrast:
        amap = amap * scaled
    if blur:
        amap = cv2.GaussianBlur(amap, (0, 0), post.blur_sigma)
    oh, ow = layout.original_shape
    if amap.shape != (oh, ow):
        amap = cv2.resize(amap, (ow, oh), interpolation=cv2.INTER_LINEAR)
    return amap.astype(np.float32)


def variants(post: VAEPost, tile: tuple[int, int]) -> dict[str, Callable[[np.ndarray, np.ndarray, Layout], np.ndarray]]:
    def make(fn: Residual, *, edge: bool = False, dog: bool = False, contrast: bool = True):
        def amap(scaled: np.ndarray, recon: np.ndarray, layout: Layout) -> np.ndarray:
            residual = stitch(scaled, recon, layout, tile, post.border, fn)
            if edge:
                residual = edge_normalised(scaled, residual)
            if dog:
                residual = blob_filter(residual)
            return finish(residual, scaled, layout, post, contrast=contrast, blur=not dog)

        return amap

    return {
        "current": make(squared),
        "no-contrast": make(squared, contrast=False),
        "brighter": make(brighter),
        "darker": make(darker),
        "edge-norm": make(squared, edge=True),
        "dog": make(squared, dog=True),
        "brighter-edge": make(brighter, edge=True),
        "brighter-dog": make(brighter, dog=True),
        "darker-dog": make(darker, dog=True),
    }


def reconstructions(
    engine: InferenceEngine, samples: list[Sample]
) -> list[tuple[Sample, np.ndarray, np.ndarray, Layout]]:
    """(sample, scaled input, VAE reconstruction tiles, layout) per image, through the bundle's ONNX model."""
    spec = engine.manifest.models["vae"]
    runner = engine._runners["vae"]  # the engine's own session for the VAE: the figures are the device's
    prep = spec.preprocessing
    rows = []
    for sample in samples:
        image = sample.load()
        unit = windowed(image, prep)
        layout = layout_for(image.shape, prep)
        batch = engine._builder(prep).build(unit, layout)
        recon = runner.run(batch)["reconstruction"].copy()
        rows.append((sample, scaled_unit(unit, layout).copy(), recon, layout))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a bundle with a VAE")
    parser.add_argument("--data", required=True, help="the data set (its default split: val calibrates, test scores)")
    parser.add_argument("--variants", default="", help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    _, _train, val, test, _split = datasets_for(args.data, None)
    engine = InferenceEngine.load(args.bundle, providers=["cpu"], skip_unneeded_models=False)
    spec = engine.manifest.models["vae"]
    post = spec.postprocessing
    assert isinstance(post, VAEPost)
    data = {
        name: reconstructions(engine, [s for s in ds.samples if s.annotated])
        for name, ds in (("val", val), ("test", test))
    }
    kind = EXPORT_KINDS["vae"]
    table = variants(post, spec.preprocessing.input_size)
    chosen = args.variants.split(",") if args.variants else list(table)
    print(f"bundle {engine.manifest.bundle_id}; val {len(data['val'])} images, test {len(data['test'])} images")
    print(
        f"{'variant':<14}{'AUROC val':>10}{'test':>7}{'avg F1':>8}{'avg IoU':>8}{'R@.25':>7}{'P@.25':>7}{'img F1':>8}"
    )
    for name in chosen:
        start = time.perf_counter()
        outputs, samples = {}, {}
        for split, rows in data.items():
            outputs[split] = []
            samples[split] = [r[0] for r in rows]
            for _sample, scaled, recon, layout in rows:
                amap = table[name](scaled, recon, layout)
                score = image_score_from_map(amap, post.image_score_quantile)
                out = VAEOutput(score=score, anomaly_map=amap)
                outputs[split].append(ModelOutputs(amap.shape[0], amap.shape[1], {"vae": out}))
        thresholds, _figures = kind.calibrate(outputs["val"], samples["val"])
        ev = kind.evaluate(outputs["test"], samples["test"], thresholds)
        au = {
            split: metrics.auroc(
                [o.models["vae"].score for o in outputs[split]], [bool(s.label) for s in samples[split]]
            )
            for split in outputs
        }
        print(
            f"{name:<14}{au['val']:>10.3f}{au['test']:>7.3f}{ev['study']['avg_f1']:>8.3f}{ev['study']['avg_iou']:>8.3f}"
            f"{ev['box']['iou25']['recall']:>7.3f}{ev['box']['iou25']['precision']:>7.3f}{ev['image']['f1']:>8.3f}"
            f"   ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
