"""Training the three models in MXNet Gluon on native-resolution tiles.

Each trainer writes a run folder: `model.params` (Gluon parameters) and `train.json` (what the
network is, its preprocessing, the split, per-epoch losses, time and device) that `build` reads.
Data-parallel over the GPUs given (`--gpus 0,1`), CPU otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from lineside.agent.bundle.manifest import Preprocessing, TrainingSummary
from lineside.agent.errors import DatasetError, ExportError
from lineside.agent.inference.preprocess import normalise_tiles
from lineside.export import simulate
from lineside.export.data.base import Dataset
from lineside.export.data.splits import Split
from lineside.export.tiles import LoadedImage, TileSampler, augment, intensity_stats, load_images

logger = logging.getLogger(__name__)
TRAIN_FILE = "train.json"
PARAMS_FILE = "model.params"


@dataclass
class TrainOptions:
    """What every `train-*` command takes."""

    out: Path
    epochs: int = 10
    seed: int = 0
    gpus: list[int] = field(default_factory=list)
    batch_size: int = 16
    iters_per_epoch: int = 50
    val_batches: int = 8
    learning_rate: float = 1e-3
    preset: str | None = None
    pretrained: bool = False
    init_from: Path | None = None  # continue from an earlier run of the same kind and architecture
    simulate: float = 0.0  # share of positive tiles with simulated defects (export.simulate)
    copy_paste: float = 0.0  # share of those simulated tiles made by copy-paste of real defects
    imagenet: str | None = None  # ImageNet MobileNetV2 weights (.pth path or "auto"), export.imagenet


def contexts(gpus: list[int]) -> list[mx.Context]:
    if not gpus:
        return [mx.cpu()]
    available = mx.context.num_gpus()
    missing = [g for g in gpus if g >= available]
    if missing:
        raise ExportError(f"--gpus {gpus}: this machine has {available} GPU(s), so {missing} do not exist")
    return [mx.gpu(g) for g in gpus]


def device_name(ctxs: list[mx.Context]) -> str:
    if ctxs[0].device_type == "cpu":
        return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return ", ".join(str(c) for c in ctxs)


def _zoo(build: Callable[[], gluon.HybridBlock], what: str) -> gluon.HybridBlock:
    """Build a network that needs GluonCV model-zoo weights, with a clear error when offline."""
    try:
        return build()
    except Exception as err:  # gluoncv raises requests/OSError/URLError variants when offline
        raise ExportError(
            f"--pretrained: could not get the GluonCV zoo weights for {what} ({err}); "
            "train from scratch without --pretrained, or pre-seed ~/.mxnet/models"
        ) from err


def _continue_from(
    opts: TrainOptions, kind: str, arch: dict[str, Any], prep: Preprocessing, net: gluon.HybridBlock, ctxs
) -> Preprocessing:
    """Load an earlier run's weights (`--init-from`); keep its preprocessing so the weights still fit."""
    if opts.init_from is None:
        return prep
    record = read_run(opts.init_from, kind)
    if record["architecture"] != arch:
        raise ExportError(f"--init-from {opts.init_from}: architecture {record['architecture']} is not {arch}")
    net.load_parameters(str(Path(opts.init_from) / PARAMS_FILE), ctx=ctxs)
    logger.info("continuing from %s (%s epochs)", opts.init_from, record["training"]["epochs"])
    return Preprocessing.model_validate(record["preprocessing"])


def seed_everything(seed: int) -> np.random.Generator:
    mx.random.seed(seed)
    np.random.seed(seed)
    return np.random.default_rng(seed)


def make_preprocessing(
    mode: str, size: int, overlap: int, images: list[LoadedImage], rng, channels: int = 1
) -> Preprocessing:
    """Grey tiles; 3 channels only for ImageNet-pretrained backbones, which expect them."""
    mean, std = intensity_stats(images, rng)
    return Preprocessing(
        mode=mode,  # type: ignore[arg-type]
        input_size=(size, size),
        tile_overlap=overlap if mode == "tile" else 0,
        channels=channels,  # type: ignore[arg-type]
        mean=mean,
        std=std,
        pad_value=mean,
    )


def _split_load(batch: np.ndarray, ctxs: list[mx.Context]) -> list[mx.nd.NDArray]:
    return gluon.utils.split_and_load(mx.nd.array(batch), ctxs, even_split=False)


def _loop(
    name: str,
    opts: TrainOptions,
    trainer: gluon.Trainer,
    step: Callable[[bool], float],
    validate: Callable[[], float],
    checkpoint: Callable[[list[dict[str, float]], float], object],
) -> tuple[list[dict[str, float]], float]:
    """Epoch loop with tqdm progress; per-epoch mean train loss and validation loss."""
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(1, opts.epochs + 1):
        losses = []
        bar = tqdm(
            range(opts.iters_per_epoch),
            desc=f"{name} epoch {epoch}/{opts.epochs}",
            unit="it",
            leave=False,
            disable=None,
        )
        for _ in bar:
            losses.append(step(True))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        train_loss = float(np.mean(losses))
        val_loss = validate()
        if not np.isfinite(train_loss):
            raise ExportError(f"{name}: training diverged at epoch {epoch} (loss {train_loss})")
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        seconds = time.perf_counter() - start
        tqdm.write(
            f"{name} epoch {epoch}/{opts.epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f} "
            f"({seconds:.0f} s)"
        )
        # A usable run folder after every epoch: long runs can be built from before they end.
        checkpoint(history, seconds)
    return history, time.perf_counter() - start


def _write_run(
    history: list[dict[str, float]],
    seconds: float,
    *,
    opts: TrainOptions,
    net: gluon.HybridBlock,
    kind: str,
    arch: dict[str, Any],
    prep: Preprocessing,
    ctxs: list[mx.Context],
    train: Dataset,
    val: Dataset,
    split: Split | None,
    n_train: int,
    n_val: int,
) -> Path:
    opts.out.mkdir(parents=True, exist_ok=True)
    tmp = opts.out / (PARAMS_FILE + ".tmp")
    net.save_parameters(str(tmp))
    os.replace(tmp, opts.out / PARAMS_FILE)
    summary = TrainingSummary(
        epochs=len(history),
        seconds=round(seconds, 1),
        device=device_name(ctxs),
        train_items=n_train,
        val_items=n_val,
        final_train_loss=history[-1]["train_loss"] if history else None,
        final_val_loss=history[-1]["val_loss"] if history else None,
        params={
            "seed": opts.seed,
            "batch_size": opts.batch_size,
            "iters_per_epoch": opts.iters_per_epoch,
            "learning_rate": opts.learning_rate,
            "simulate": opts.simulate,
            "copy_paste": opts.copy_paste,
            "imagenet": opts.imagenet,
        },
    )
    record = {
        "kind": kind,
        "architecture": arch,
        "preprocessing": prep.model_dump(mode="json"),
        "training": summary.model_dump(mode="json"),
        "history": history,
        "dataset": {"root": str(train.root), "train_groups": train.groups(), "val_groups": val.groups()},
        "split": split.model_dump(mode="json") if split is not None else None,
    }
    (opts.out / TRAIN_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("%s run written to %s (%.0f s)", kind, opts.out, seconds)
    return opts.out


def read_run(folder: Path, kind: str) -> dict[str, Any]:
    path = Path(folder) / TRAIN_FILE
    if not path.is_file() or not (Path(folder) / PARAMS_FILE).is_file():
        raise ExportError(f"{folder}: not a training run folder (expected {TRAIN_FILE} and {PARAMS_FILE})")
    record = json.loads(path.read_text(encoding="utf-8"))
    if record.get("kind") != kind:
        raise ExportError(f"{path}: holds a {record.get('kind')!r} run, expected a {kind!r} run")
    return record


# -- SSD ----------------------------------------------------------------------------------------


def _ssd_batch(sampler: TileSampler, n: int, rng, positive_share: float, do_augment: bool):
    tiles, boxes = [], []
    for _ in range(n):
        if rng.random() < positive_share:
            tile, b = sampler.positive()
        else:
            tile, b = sampler.negative(), np.zeros((0, 4), np.float32)
        if do_augment:
            tile, b = augment(tile, b, rng)
        tiles.append(tile)
        boxes.append(b)
    most = max(1, max(len(b) for b in boxes))
    gt = np.full((n, most, 4), -1, np.float32)
    ids = np.full((n, most, 1), -1, np.float32)
    for i, b in enumerate(boxes):
        gt[i, : len(b)] = b
        ids[i, : len(b)] = 0
    return np.stack(tiles), gt, ids


def train_ssd(train: Dataset, val: Dataset, opts: TrainOptions, split: Split | None = None) -> Path:
    from gluoncv.loss import SSDMultiBoxLoss
    from gluoncv.model_zoo.ssd.target import SSDTargetGenerator

    from lineside.export.models.ssd import PRESETS, anchors_of, build_ssd

    preset_name = opts.preset or "tile256-mobilenet0.25"
    if preset_name not in PRESETS:
        raise ExportError(f"unknown SSD preset {preset_name!r}; choose one of {sorted(PRESETS)}")
    preset = PRESETS[preset_name]
    rng = seed_everything(opts.seed)
    ctxs = contexts(opts.gpus)
    size = preset.input_size
    probe = Preprocessing(mode=preset.mode, input_size=(size, size), channels=1, mean=0.5, std=0.25)  # type: ignore[arg-type]
    train_images = load_images(train, probe, "ssd train")
    val_images = load_images(val, probe, "ssd val")
    rgb = opts.pretrained or preset.rgb
    prep = make_preprocessing(preset.mode, size, 32, train_images, rng, 3 if rgb else 1).model_copy(
        update={"tile_overlap": 32 if preset.mode == "tile" else 0}
    )
    sampler = TileSampler(train_images, size, prep.mean, rng)
    simulate.attach(sampler, train_images, opts.simulate, opts.copy_paste, opts.seed)  # training split only
    val_sampler = TileSampler(val_images, size, prep.mean, np.random.default_rng(opts.seed + 1))
    if not val_sampler.defective:
        raise DatasetError(f"{val.root}: the validation split has no annotated defective image")
    net = (
        _zoo(lambda: build_ssd(preset, pretrained_base=True), preset.network) if opts.pretrained else build_ssd(preset)
    )
    net.initialize(ctx=ctxs)
    anchors = anchors_of(net, size, ctxs[0]).expand_dims(0)  # also fixes every deferred shape
    # GluonCV's default init is uniform; from scratch, Xavier on the conv weights trains faster.
    for name, param in net.collect_params().items():
        if name.endswith("weight") and len(param.shape) >= 2 and not (opts.pretrained and "features" in name):
            param.initialize(mx.init.Xavier(magnitude=2), ctx=ctxs, force_reinit=True)
    if opts.imagenet:
        from lineside.export.imagenet import load_backbone

        load_backbone(net, opts.imagenet)
    prep = _continue_from(opts, "ssd", {"preset": preset_name}, prep, net, ctxs)
    net.hybridize(static_alloc=True, static_shape=True)
    target_gen = SSDTargetGenerator(iou_thresh=0.5, stds=(0.1, 0.1, 0.2, 0.2), negative_mining_ratio=-1)
    # min_hard_negatives lets defect-free tiles teach the background too.
    loss_fn = SSDMultiBoxLoss(min_hard_negatives=32)
    steps = opts.epochs * opts.iters_per_epoch
    schedule = mx.lr_scheduler.CosineScheduler(
        max_update=max(steps, 1),
        base_lr=opts.learning_rate,
        final_lr=opts.learning_rate * 0.02,
        warmup_steps=min(200, steps // 10),
    )
    trainer = gluon.Trainer(
        net.collect_params(),
        "adam",
        {"learning_rate": opts.learning_rate, "lr_scheduler": schedule, "wd": 1e-4},
    )
    val_batches = [
        _ssd_batch(val_sampler, opts.batch_size, val_sampler.rng, 0.75, False) for _ in range(opts.val_batches)
    ]

    def targets(gt: np.ndarray, ids: np.ndarray):
        cls_t, box_t, _ = target_gen(anchors, None, mx.nd.array(gt), mx.nd.array(ids))
        # Padding boxes (-1) encode to inf; the loss multiplies them by 0, which gives NaN. Zero them.
        positive = mx.nd.broadcast_like((cls_t > 0).expand_dims(-1), box_t)
        return cls_t, mx.nd.where(positive, box_t, mx.nd.zeros_like(box_t))

    def losses(tiles, gt, ids, train_mode: bool) -> float:
        x = normalise_tiles(tiles, prep)
        cls_t, box_t = targets(gt, ids)
        xs = _split_load(x, ctxs)
        cts = gluon.utils.split_and_load(cls_t, ctxs, even_split=False)
        bts = gluon.utils.split_and_load(box_t, ctxs, even_split=False)
        if train_mode:
            with autograd.record():
                outs = [net(xi) for xi in xs]
                total, _, _ = loss_fn([o[0] for o in outs], [o[1] for o in outs], cts, bts)
                autograd.backward(total)
            trainer.step(1)
        else:
            with autograd.predict_mode():  # BatchNorm on running statistics, as deployed
                outs = [_raw_heads(net, xi) for xi in xs]
            total, _, _ = loss_fn([o[0] for o in outs], [o[1] for o in outs], cts, bts)
        return float(sum(t.sum().asscalar() for t in total))

    def step(_: bool) -> float:
        return losses(*_ssd_batch(sampler, opts.batch_size, rng, 0.75, True), True)

    def validate() -> float:
        return float(np.mean([losses(*b, False) for b in val_batches]))

    arch = {"preset": preset_name}

    checkpoint = partial(
        _write_run, opts=opts, net=net, kind="ssd", arch=arch, prep=prep, ctxs=ctxs, train=train, val=val,
        split=split, n_train=len(train_images), n_val=len(val_images),
    )  # fmt: skip

    _loop("ssd", opts, trainer, step, validate, checkpoint)
    return opts.out


def _raw_heads(net, x):
    """(class logits, box deltas) of a GluonCV SSD in inference mode (BatchNorm uses running stats)."""
    features = net.features(x)
    cls = [
        mx.nd.flatten(mx.nd.transpose(cp(f), (0, 2, 3, 1)))
        for f, cp in zip(features, net.class_predictors, strict=True)
    ]
    box = [
        mx.nd.flatten(mx.nd.transpose(bp(f), (0, 2, 3, 1))) for f, bp in zip(features, net.box_predictors, strict=True)
    ]
    cls = mx.nd.concat(*cls, dim=1).reshape((0, -1, net.num_classes + 1))
    box = mx.nd.concat(*box, dim=1).reshape((0, -1, 4))
    return cls, box


# -- classifier ---------------------------------------------------------------------------------


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


def train_classifier(train: Dataset, val: Dataset, opts: TrainOptions, split: Split | None = None) -> Path:
    from lineside.export.models.classifier import CLASSIFIER_TILE, build_classifier

    backbone = opts.preset or "mobilenet0.25"
    size = CLASSIFIER_TILE
    rng = seed_everything(opts.seed)
    ctxs = contexts(opts.gpus)
    probe = Preprocessing(mode="tile", input_size=(size, size), channels=1, mean=0.5, std=0.25)
    train_images = load_images(train, probe, "classifier train")
    val_images = load_images(val, probe, "classifier val")
    prep = make_preprocessing("tile", size, 16, train_images, rng, 3 if opts.pretrained else 1)
    sampler = TileSampler(train_images, size, prep.mean, rng)
    simulate.attach(sampler, train_images, opts.simulate, opts.copy_paste, opts.seed)  # training split only
    val_sampler = TileSampler(val_images, size, prep.mean, np.random.default_rng(opts.seed + 1))
    if opts.pretrained:
        net = _zoo(lambda: build_classifier(backbone, pretrained=True), backbone)
        net.output.initialize(mx.init.Xavier(), ctx=ctxs)
        net.collect_params().reset_ctx(ctxs)
    else:
        net = build_classifier(backbone)
        net.initialize(mx.init.Xavier(), ctx=ctxs)
    net.hybridize(static_alloc=True, static_shape=True)
    steps = opts.epochs * opts.iters_per_epoch
    schedule = mx.lr_scheduler.CosineScheduler(
        max_update=max(steps, 1), base_lr=opts.learning_rate, final_lr=opts.learning_rate * 0.02
    )
    trainer = gluon.Trainer(
        net.collect_params(),
        "adam",
        {"learning_rate": opts.learning_rate, "lr_scheduler": schedule, "wd": 1e-4},
    )
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    val_batches = [_cls_batch(val_sampler, opts.batch_size, val_sampler.rng, False) for _ in range(opts.val_batches)]

    def run(tiles, labels, train_mode: bool) -> float:
        xs = _split_load(normalise_tiles(tiles, prep), ctxs)
        ys = _split_load(labels, ctxs)
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

    def validate() -> float:
        return float(np.mean([run(*b, False) for b in val_batches]))

    arch = {"backbone": backbone}
    checkpoint = partial(
        _write_run, opts=opts, net=net, kind="classifier", arch=arch, prep=prep, ctxs=ctxs, train=train, val=val,
        split=split, n_train=len(train_images), n_val=len(val_images),
    )  # fmt: skip

    _loop("classifier", opts, trainer, step, validate, checkpoint)
    return opts.out


# -- VAE ----------------------------------------------------------------------------------------

VAE_TILE = 128


def train_vae(train: Dataset, val: Dataset, opts: TrainOptions, split: Split | None = None) -> Path:
    """Unsupervised: trains on defect-free tiles only (unannotated series count as mostly normal)."""
    from lineside.export.models.vae import ConvVAE, vae_loss

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
    steps = opts.epochs * opts.iters_per_epoch
    schedule = mx.lr_scheduler.CosineScheduler(
        max_update=max(steps, 1), base_lr=opts.learning_rate, final_lr=opts.learning_rate * 0.05
    )
    trainer = gluon.Trainer(
        net.collect_params(), "adam", {"learning_rate": opts.learning_rate, "lr_scheduler": schedule}
    )
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
        xs = _split_load(normalise_tiles(tiles, prep), ctxs)
        ts = _split_load(tiles[:, None], ctxs)
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

    def validate() -> float:
        return float(np.mean([run(b, False) for b in val_batches]))

    arch = {"width": width, "latent_channels": latent, "beta": beta}

    checkpoint = partial(
        _write_run, opts=opts, net=net, kind="vae", arch=arch, prep=prep, ctxs=ctxs, train=train, val=val,
        split=split, n_train=len(train_images), n_val=len(val_images),
    )  # fmt: skip

    _loop("vae", opts, trainer, step, validate, checkpoint)
    return opts.out
