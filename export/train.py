"""What every model kind's training shares (MXNet Gluon on native-resolution tiles).

Each kind's trainer (`export/models/<kind>/kind.py`) writes a run folder: `model.params` (Gluon
parameters) and `train.json` (`RunRecord`: what the network is, its preprocessing, the split,
per-epoch losses, time and device) that `build` reads. Data-parallel over the GPUs given
(`--gpus 0,1`), CPU otherwise.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import gluon
from tqdm import tqdm

from lineside.agent.bundle.manifest import Preprocessing, TrainingSummary
from lineside.agent.errors import ExportError
from lineside.export.data.base import Dataset
from lineside.export.data.splits import Split
from lineside.export.runs import PARAMS_FILE, TRAIN_FILE, EpochRecord, RunDataset, RunRecord
from lineside.export.tiles import LoadedImage, intensity_stats

logger = logging.getLogger(__name__)


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


def zoo(build: Callable[[], gluon.HybridBlock], what: str) -> gluon.HybridBlock:
    """Build a network that needs GluonCV model-zoo weights, with a clear error when offline."""
    try:
        return build()
    except Exception as err:  # gluoncv raises requests/OSError/URLError variants when offline
        raise ExportError(
            f"--pretrained: could not get the GluonCV zoo weights for {what} ({err}); "
            "train from scratch without --pretrained, or pre-seed ~/.mxnet/models"
        ) from err


def continue_from(
    opts: TrainOptions, kind: str, arch: dict[str, Any], prep: Preprocessing, net: gluon.HybridBlock, ctxs
) -> Preprocessing:
    """Load an earlier run's weights (`--init-from`); keep its preprocessing so the weights still fit."""
    if opts.init_from is None:
        return prep
    record = read_run(opts.init_from, kind)
    if record.architecture != arch:
        raise ExportError(f"--init-from {opts.init_from}: architecture {record.architecture} is not {arch}")
    net.load_parameters(str(Path(opts.init_from) / PARAMS_FILE), ctx=ctxs)
    logger.info("continuing from %s (%s epochs)", opts.init_from, record.training.epochs)
    return record.preprocessing


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


def split_load(batch: np.ndarray, ctxs: list[mx.Context]) -> list[mx.nd.NDArray]:
    return gluon.utils.split_and_load(mx.nd.array(batch), ctxs, even_split=False)


def run_loop(
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


def write_run(
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
    record = RunRecord(
        kind=kind,
        architecture=arch,
        preprocessing=prep,
        training=summary,
        history=[EpochRecord.model_validate(h) for h in history],
        dataset=RunDataset(root=str(train.root), train_groups=train.groups(), val_groups=val.groups()),
        split=split,
    )
    tmp_record = opts.out / (TRAIN_FILE + ".tmp")
    tmp_record.write_text(record.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_record, opts.out / TRAIN_FILE)
    logger.info("%s run written to %s (%.0f s)", kind, opts.out, seconds)
    return opts.out


def read_run(folder: Path, kind: str) -> RunRecord:
    """The typed `train.json` of a run folder of `kind`; ExportError naming the problem otherwise."""
    path = Path(folder) / TRAIN_FILE
    if not path.is_file() or not (Path(folder) / PARAMS_FILE).is_file():
        raise ExportError(f"{folder}: not a training run folder (expected {TRAIN_FILE} and {PARAMS_FILE})")
    try:
        record = RunRecord.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ExportError(f"{path}: not a valid run record: {err}") from err
    if record.kind != kind:
        raise ExportError(f"{path}: holds a {record.kind!r} run, expected a {kind!r} run")
    return record
