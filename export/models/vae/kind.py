"""The convolutional VAE as a model kind: unsupervised training on normal tiles, export, calibration of the
image threshold (F1) and of the pixel level and minimum area of its boxes (the study's avg F1)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd

from lineside.agent.bundle.schema import Preprocessing
from lineside.agent.inference.preprocess import normalise_tiles
from lineside.agent.inference.types import ModelOutputs
from lineside.agent.models import VAE, KindPost, VAEOutput, VAEPost, VAEThresholds
from lineside.export import metrics
from lineside.export.data.base import Dataset, Sample
from lineside.export.data.splits import Split
from lineside.export.models.base import ExportKind
from lineside.export.models.vae.network import ConvVAE, VAEExport, vae_loss
from lineside.export.runs import PARAMS_FILE, RunRecord
from lineside.export.tiles import TileSampler, augment, load_images
from lineside.export.train import (
    TrainOptions,
    WeightAverage,
    contexts,
    make_preprocessing,
    make_trainer,
    refresh_batch_stats,
    resume_run,
    run_loop,
    seed_everything,
    split_load,
    write_run,
)

VAE_TILE = 128
PIXEL_QUANTILES = (0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9998, 0.9999)
MIN_AREAS = (4, 16, 36, 64, 100)


class VAEKind(ExportKind):
    name = "vae"
    device = VAE
    default_epochs = 10
    tolerances = {"reconstruction": 1e-3}  # noqa: RUF012 - read-only

    def train(self, train: Dataset, val: Dataset, opts: TrainOptions, split: Split | None = None) -> Path:
        """Unsupervised: trains on defect-free tiles only (unannotated series count as mostly normal)."""
        width, latent, beta = 16, 8, 0.5
        rng = seed_everything(opts.seed)
        ctxs = contexts(opts.gpus)
        probe = Preprocessing(mode="tile", input_size=(VAE_TILE, VAE_TILE), channels=1, mean=0.5, std=0.25)
        train_images = load_images(train, probe, "vae train")
        val_images = load_images(val, probe, "vae val")
        prep = make_preprocessing("tile", VAE_TILE, 16, train_images, rng)
        sampler = TileSampler(train_images, VAE_TILE, prep.mean, rng)
        val_sampler = TileSampler(val_images, VAE_TILE, prep.mean, np.random.default_rng(opts.seed + 1))
        net = ConvVAE(latent_channels=latent, width=width)
        net.initialize(mx.init.Xavier(), ctx=ctxs)
        net.hybridize(static_alloc=True, static_shape=True)
        trainer, clock = make_trainer(net, opts, final_share=0.05, wd=None)
        arch = {"width": width, "latent_channels": latent, "beta": beta}
        prep, history = resume_run(opts, "vae", arch, prep, net, trainer, clock, ctxs)
        average = WeightAverage.start(net, opts, ctxs, resumed=bool(history))
        empty = np.zeros((0, 4), np.float32)
        lat = VAE_TILE // 16

        def batch(s: TileSampler, r, do_augment: bool) -> np.ndarray:
            tiles = []
            for _ in range(opts.batch_size):
                tile = s.negative(include_unannotated=True)
                if do_augment:
                    tile, _ = augment(tile, empty, r)
                tiles.append(tile)
            return np.stack(tiles)

        val_batches = [batch(val_sampler, val_sampler.rng, False) for _ in range(opts.val_batches)]

        def run(tiles: np.ndarray, train_mode: bool) -> float:
            xs = split_load(normalise_tiles(tiles, prep), ctxs)
            ts = split_load(tiles[:, None], ctxs)
            if train_mode:
                with autograd.record():
                    ls = []
                    for x, t in zip(xs, ts, strict=True):
                        eps = mx.nd.random.normal(shape=(x.shape[0], latent, lat, lat), ctx=x.context)
                        recon, mu, logvar = net(x, eps)
                        ls.append(vae_loss(recon, t, mu, logvar, beta))
                autograd.backward(ls)
                trainer.step(len(tiles))
            else:
                ls = []
                for x, t in zip(xs, ts, strict=True):
                    recon, mu, logvar = net(x, mx.nd.zeros((x.shape[0], latent, lat, lat), ctx=x.context))
                    ls.append(vae_loss(recon, t, mu, logvar, beta))
            return float(sum(loss.sum().asscalar() for loss in ls) / len(tiles))

        def step(_: bool) -> float:
            return run(batch(sampler, rng, True), True)

        stats_sampler = TileSampler(train_images, VAE_TILE, prep.mean, np.random.default_rng(opts.seed + 2))

        def stats_inputs() -> list[tuple[mx.nd.NDArray, ...]]:
            xs = split_load(normalise_tiles(batch(stats_sampler, stats_sampler.rng, True), prep), ctxs)
            return [(x, mx.nd.random.normal(shape=(x.shape[0], latent, lat, lat), ctx=x.context)) for x in xs]

        def validate() -> float:
            return float(np.mean([run(b, False) for b in val_batches]))

        checkpoint = partial(
            write_run, opts=opts, net=net, kind="vae", arch=arch, prep=prep, ctxs=ctxs, train=train, val=val,
            split=split, n_train=len(train_images), n_val=len(val_images),
        )  # fmt: skip

        refresh = partial(refresh_batch_stats, net, stats_inputs)
        run_loop("vae", opts, trainer, step, validate, checkpoint, clock, history, average, refresh)
        return opts.out

    def post(self, net: mx.gluon.HybridBlock, record: RunRecord, bundle_dir: Path) -> KindPost:
        """The map is read inside the part (measured in docs/evaluation.md; `build --post vae.part_mask=false`
        turns it off)."""
        return VAEPost(part_mask=True)

    def load(self, run: Path, record: RunRecord) -> tuple[Any, Any, str]:
        arch = record.architecture
        net = ConvVAE(latent_channels=arch["latent_channels"], width=arch["width"])
        net.load_parameters(str(run / PARAMS_FILE), ctx=mx.cpu())
        return net, VAEExport(net), f"conv-vae width {arch['width']} latent {arch['latent_channels']}"

    def calibrate(
        self, outputs: Sequence[ModelOutputs], samples: Sequence[Sample]
    ) -> tuple[VAEThresholds, dict[str, Any]]:
        """Image threshold by image-level F1; pixel level and minimum box area by the study's avg F1 over
        validation images with defects (ties go to the most conservative setting: fewest boxes)."""
        labels = np.asarray([bool(s.label) for s in samples])
        mine = [o.models[self.name] for o in outputs]
        assert all(isinstance(m, VAEOutput) for m in mine)
        scores = np.asarray([m.score for m in mine], np.float64)
        t_img, f1_img = metrics.best_f1_threshold(scores, labels)
        th = VAEThresholds(image=float(t_img))
        maps = np.concatenate([m.anomaly_map.ravel()[::97] for m in mine])  # type: ignore[attr-defined]
        candidates = np.quantile(maps, PIXEL_QUANTILES)
        best = (-1.0, float(candidates[0]), MIN_AREAS[1])
        for pixel, area in itertools.product(candidates, MIN_AREAS):
            trial = th.model_copy(update={"pixel": float(pixel), "min_area": int(area)})
            f1 = metrics.study_table(self.image_evals(outputs, samples, trial, gate=False)).avg_f1
            if (f1, pixel, area) > best:
                best = (f1, float(pixel), int(area))
        th = th.model_copy(update={"pixel": best[1], "min_area": best[2]})
        figures = {
            "image_threshold": float(t_img),
            "image_f1": f1_img,
            "pixel_threshold": best[1],
            "min_area": best[2],
            "avg_f1_defective_images": best[0],
        }
        return th, figures
