"""The tile classifier as a model kind: training, export, calibration (image threshold by F1)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from lineside.agent.bundle.schema import Preprocessing
from lineside.agent.inference.preprocess import normalise_tiles
from lineside.agent.inference.types import ModelOutputs
from lineside.agent.models import Classifier, ClassifierThresholds
from lineside.export import metrics, simulate
from lineside.export.data.base import Dataset, Sample
from lineside.export.data.splits import Split
from lineside.export.models.base import ExportKind, add_simulation_arguments
from lineside.export.models.classifier.network import CLASSIFIER_TILE, ClassifierExport, build_classifier
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
    zoo,
)


def _cls_batch(sampler: TileSampler, n: int, rng, do_augment: bool):
    tiles, labels = [], []
    empty = np.zeros((0, 4), np.float32)
    for _ in range(n):
        positive = rng.random() < 0.5
        tile = sampler.positive()[0] if positive else sampler.negative()
        if do_augment:
            tile, _ = augment(tile, empty, rng)
        tiles.append(tile)
        labels.append(1.0 if positive else 0.0)
    return np.stack(tiles), np.asarray(labels, np.float32)


class ClassifierKind(ExportKind):
    """A GluonCV backbone with a max-pooled 2-class head on native-resolution tiles."""

    name = "classifier"
    device = Classifier
    default_epochs = 10
    tolerances = {"probabilities": 1e-3}  # noqa: RUF012 - read-only

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--preset", help="a GluonCV backbone: mobilenet0.25 (default), mobilenet1.0, resnet18_v1")
        parser.add_argument(
            "--pretrained", action="store_true", help="start from GluonCV zoo ImageNet weights (needs network)"
        )
        add_simulation_arguments(parser)

    def train(self, train: Dataset, val: Dataset, opts: TrainOptions, split: Split | None = None) -> Path:
        backbone = opts.preset or "mobilenet0.25"
        size = CLASSIFIER_TILE
        rng = seed_everything(opts.seed)
        ctxs = contexts(opts.gpus)
        probe = Preprocessing(mode="tile", input_size=(size, size), channels=1, mean=0.5, std=0.25)
        train_images = load_images(train, probe, "classifier train")
        val_images = load_images(val, probe, "classifier val")
        prep = make_preprocessing("tile", size, 16, train_images, rng, 3 if opts.pretrained else 1)
        sampler = TileSampler(train_images, size, prep.mean, rng)
        # Training split only: validation and test images never feed the simulator.
        config = simulate.SimConfig.chosen(opts.sim_px_per_mm, opts.sim_flat, opts.sim_edges)
        simulation = simulate.attach(sampler, train_images, opts.simulate, opts.copy_paste, opts.seed, config)
        val_sampler = TileSampler(val_images, size, prep.mean, np.random.default_rng(opts.seed + 1))
        if opts.pretrained:
            net = zoo(lambda: build_classifier(backbone, pretrained=True), backbone)
            net.output.initialize(mx.init.Xavier(), ctx=ctxs)
            net.collect_params().reset_ctx(ctxs)
        else:
            net = build_classifier(backbone)
            net.initialize(mx.init.Xavier(), ctx=ctxs)
        net.hybridize(static_alloc=True, static_shape=True)
        trainer, clock = make_trainer(net, opts, final_share=0.02)
        arch = {"backbone": backbone}
        prep, history = resume_run(opts, "classifier", arch, prep, net, trainer, clock, ctxs)
        average = WeightAverage.start(net, opts, ctxs, resumed=bool(history))
        loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
        val_batches = [
            _cls_batch(val_sampler, opts.batch_size, val_sampler.rng, False) for _ in range(opts.val_batches)
        ]

        def run(tiles, labels, train_mode: bool) -> float:
            xs = split_load(normalise_tiles(tiles, prep), ctxs)
            ys = split_load(labels, ctxs)
            if train_mode:
                with autograd.record():
                    ls = [loss_fn(net(x), y) for x, y in zip(xs, ys, strict=True)]
                autograd.backward(ls)
                trainer.step(len(labels))
            else:
                ls = [loss_fn(net(x), y) for x, y in zip(xs, ys, strict=True)]
            return float(sum(loss.sum().asscalar() for loss in ls) / len(labels))

        def step(_: bool) -> float:
            return run(*_cls_batch(sampler, opts.batch_size, rng, True), True)

        stats_sampler = TileSampler(train_images, size, prep.mean, np.random.default_rng(opts.seed + 2))

        def stats_inputs() -> list[tuple[mx.nd.NDArray, ...]]:
            tiles, _ = _cls_batch(stats_sampler, opts.batch_size, stats_sampler.rng, True)
            return [(x,) for x in split_load(normalise_tiles(tiles, prep), ctxs)]

        def validate() -> float:
            return float(np.mean([run(*b, False) for b in val_batches]))

        checkpoint = partial(
            write_run, opts=opts, net=net, kind="classifier", arch=arch, prep=prep, ctxs=ctxs, train=train, val=val,
            split=split, n_train=len(train_images), n_val=len(val_images), simulation=simulation,
        )  # fmt: skip

        refresh = partial(refresh_batch_stats, net, stats_inputs)
        run_loop("classifier", opts, trainer, step, validate, checkpoint, clock, history, average, refresh)
        return opts.out

    def load(self, run: Path, record: RunRecord) -> tuple[Any, Any, str]:
        backbone = record.architecture["backbone"]
        net = build_classifier(backbone)
        net.load_parameters(str(run / PARAMS_FILE), ctx=mx.cpu())
        return net, ClassifierExport(net), f"classifier {backbone} tiles, max aggregation"

    def calibrate(
        self, outputs: Sequence[ModelOutputs], samples: Sequence[Sample]
    ) -> tuple[ClassifierThresholds, dict[str, Any]]:
        """The image threshold that maximises image-level F1 on the validation series."""
        labels = np.asarray([bool(s.label) for s in samples])
        scores = np.asarray([o.models[self.name].score for o in outputs], np.float64)
        threshold, f1 = metrics.best_f1_threshold(scores, labels)
        return ClassifierThresholds(image=float(threshold)), {"threshold": float(threshold), "image_f1": f1}
