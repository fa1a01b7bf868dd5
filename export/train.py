"""What every model kind's training shares (MXNet Gluon on native-resolution tiles).

Each kind's trainer (`export/models/<kind>/kind.py`) writes a run folder: `model.params` (Gluon
parameters) and `train.json` (`RunRecord`: what the network is, its preprocessing, the split,
per-epoch losses, time and device) that `build` reads. Data-parallel over the GPUs given
(`--gpus 0,1`), CPU otherwise.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon
from tqdm import tqdm

from lineside.agent.bundle.manifest import Preprocessing, TrainingSummary
from lineside.agent.errors import ExportError
from lineside.export.data.base import Dataset
from lineside.export.data.splits import Split
from lineside.export.imagenet import imagenet_provenance
from lineside.export.runs import PARAMS_FILE, TRAIN_FILE, EpochRecord, RunDataset, RunRecord
from lineside.export.simulate import SimConfig
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
    sim_px_per_mm: tuple[float, float] | None = None  # simulator magnification range; None: SimConfig's default
    sim_flat: float = 0.0  # share of simulated pores drawn flat along the beam (SimConfig.flat_share)
    sim_edges: float = 0.0  # share of simulated defects centred on steep edges inside the part (SimConfig.edge_share)
    imagenet: str | None = None  # ImageNet MobileNetV2 weights (.pth path or "auto"), export.imagenet
    zoom: tuple[float, float] = (1.0, 1.0)  # SSD: real tiles rescaled by a factor in this range (export.tiles)
    minutes: float | None = None  # wall-clock budget for this model, all sessions together; None: epochs only
    ema: float = 0.0  # decay of the weights' moving average per step (WeightAverage); 0: off
    resume: bool = False  # continue the run in `out` (weights, optimiser state, history, time spent)


TRAINER_FILE = "trainer.states"  # optimiser state and step count, for --resume
RAW_PARAMS_FILE = "raw.params"  # with --ema: the trained (not averaged) weights, for --resume
WARMUP_SHARE = 0.05  # of the planned steps, at most WARMUP_MAX steps, from a tenth of the rate
WARMUP_MAX = 200


class TrainClock:
    """Training seconds across sessions: what earlier sessions spent plus this one's."""

    def __init__(self, budget_s: float | None) -> None:
        self.budget_s = budget_s
        self.before = 0.0
        self.started = time.perf_counter()

    def used(self) -> float:
        return self.before + time.perf_counter() - self.started

    def progress(self) -> float:
        """Share of the budget used (0 without a budget)."""
        return self.used() / self.budget_s if self.budget_s else 0.0

    def over(self, reserve_s: float = 0.0) -> bool:
        """True once the budget, less `reserve_s` kept for work that stopping now still needs, is used."""
        return self.budget_s is not None and self.used() + reserve_s >= self.budget_s

    def __getstate__(self) -> dict[str, Any]:  # pickled with the optimiser: keep no live timer
        return {"budget_s": self.budget_s, "before": self.before, "started": 0.0}


class BudgetSchedule(mx.lr_scheduler.LRScheduler):
    """Linear warm-up, then cosine decay to `final_lr`. Progress is the larger of steps done / planned and
    time used / budget, so whichever of `--epochs` and `--minutes` ends first, the rate has decayed."""

    def __init__(self, max_update: int, base_lr: float, final_lr: float, clock: TrainClock) -> None:
        super().__init__(base_lr=base_lr)
        self.max_update = max(max_update, 1)
        self.final_lr = final_lr
        self.warmup = min(WARMUP_MAX, int(self.max_update * WARMUP_SHARE))
        self.clock = clock

    def __call__(self, num_update: int) -> float:
        if num_update < self.warmup:
            return self.base_lr * (0.1 + 0.9 * num_update / self.warmup)
        progress = min(1.0, max(num_update / self.max_update, self.clock.progress()))
        return self.final_lr + (self.base_lr - self.final_lr) * (1 + math.cos(math.pi * progress)) / 2


def make_trainer(
    net: gluon.HybridBlock, opts: TrainOptions, *, final_share: float, wd: float | None = 1e-4
) -> tuple[gluon.Trainer, TrainClock]:
    """Adam with the budget-aware schedule; the clock is shared with `run_loop`."""
    clock = TrainClock(opts.minutes * 60 if opts.minutes else None)
    schedule = BudgetSchedule(
        opts.epochs * opts.iters_per_epoch, opts.learning_rate, opts.learning_rate * final_share, clock
    )
    params: dict[str, Any] = {"learning_rate": opts.learning_rate, "lr_scheduler": schedule}
    if wd:
        params["wd"] = wd
    return gluon.Trainer(net.collect_params(), "adam", params), clock


def resume_run(
    opts: TrainOptions,
    kind: str,
    arch: dict[str, Any],
    prep: Preprocessing,
    net: gluon.HybridBlock,
    trainer: gluon.Trainer,
    clock: TrainClock,
    ctxs: list[mx.Context],
) -> tuple[Preprocessing, list[dict[str, float]]]:
    """With `--resume` and a run in `out`: its weights, optimiser state, history and time spent.

    Returns (preprocessing, history); without a run to resume, (prep, []) and training starts afresh.
    """
    if not opts.resume or not (opts.out / TRAIN_FILE).is_file():
        return prep, []
    record = read_run(opts.out, kind)
    if record.architecture != arch:
        raise ExportError(f"--resume {opts.out}: architecture {record.architecture} is not {arch}")
    # With --ema, model.params holds the average (what build reads) and raw.params the weights training goes on from.
    raw = opts.out / RAW_PARAMS_FILE
    net.load_parameters(str(raw if raw.is_file() else opts.out / PARAMS_FILE), ctx=ctxs)
    schedule = trainer.optimizer.lr_scheduler
    if (opts.out / TRAINER_FILE).is_file():
        trainer.load_states(str(opts.out / TRAINER_FILE))
        trainer.optimizer.lr_scheduler = schedule  # the pickled one holds a dead clock
    clock.before = record.training.seconds
    history = [h.model_dump() for h in record.history]
    logger.info("resuming %s from %s: %d epochs, %.0f s done", kind, opts.out, len(history), clock.before)
    return record.preprocessing, history


class WeightAverage:
    """An exponential moving average of a network's weights and BatchNorm statistics, updated after every
    step; validation and the saved model use it (the raw weights are saved beside it for --resume).

    One run's snapshots differ by several points of avg F1 from epoch to epoch (docs/evaluation.md); an
    average over many steps is a flatter, steadier solution (YOLOv5's model EMA, SWA). The decay at step
    t is min(decay, (t - 1) / (t + 2)): early on the average leans to recent steps (about 70 % of its
    weight on the last third of the steps taken), so the random start and the warm-up fade out; the cap
    (0.999: about the last 1000 steps) is reached near step 3000. BatchNorm's running statistics are
    averaged with the weights rather than recomputed (as SWA does): they move slowly at the end of a run.

    Weights are swapped in place on every device, never through `Parameter.set_data`, which resets the
    trainer's kvstore (the optimiser state) when there are several GPUs.
    """

    def __init__(self, net: gluon.HybridBlock, decay: float, ctx: mx.Context) -> None:
        self.net, self.decay, self.ctx = net, decay, ctx
        # Structural names, as save_parameters writes them: a saved average is read back by name.
        self.named = dict(net._collect_params_with_prefix())
        self.params = list(self.named.values())
        self.shadow: list[mx.nd.NDArray] | None = None  # at the first step: shapes may be deferred until then

    @classmethod
    def start(
        cls, net: gluon.HybridBlock, opts: TrainOptions, ctxs: list[mx.Context], resumed: bool
    ) -> WeightAverage | None:
        """None without --ema; on a resumed run trained with it, the average saved in model.params carries on
        (`resume_run` has loaded the raw weights into the net)."""
        if opts.ema <= 0:
            return None
        average = cls(net, opts.ema, ctxs[0])
        if resumed and (opts.out / RAW_PARAMS_FILE).is_file():
            saved = mx.nd.load(str(opts.out / PARAMS_FILE))
            missing = sorted(set(average.named) - set(saved))
            if missing:
                raise ExportError(f"--resume {opts.out}: {PARAMS_FILE} lacks {missing[:3]}: not this network's average")
            average.shadow = [saved[name].as_in_context(ctxs[0]) for name in average.named]
        elif resumed:
            logger.warning("--ema on a run trained without it: the average starts from its last weights")
        return average

    def update(self, step: int) -> None:
        if self.shadow is None:
            self.shadow = [p.data(self.ctx).copy() for p in self.params]
            return
        d = min(self.decay, max(step - 1, 0) / (step + 2))
        for shadow, p in zip(self.shadow, self.params, strict=True):
            shadow *= d
            shadow += (1 - d) * p.data(self.ctx)

    def save_raw(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (RAW_PARAMS_FILE + ".tmp")
        self.net.save_parameters(str(tmp))
        os.replace(tmp, out / RAW_PARAMS_FILE)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The network holds the average inside the block, its trained weights again after it."""
        if self.shadow is None:  # no step yet
            yield
            return
        raw = [[a.copy() for a in p.list_data()] for p in self.params]  # per device: BatchNorm stats differ
        for shadow, p in zip(self.shadow, self.params, strict=True):
            for a in p.list_data():
                a[:] = shadow.as_in_context(a.context)
        try:
            yield
        finally:
            for kept, p in zip(raw, self.params, strict=True):
                for a, k in zip(p.list_data(), kept, strict=True):
                    a[:] = k


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


# BatchNorm's running statistics (momentum 0.9) keep 0.9**k of their start (mean 0, variance 1) after k
# steps. A run that ends before STATS_WARM_STEPS steps has them re-estimated at its last checkpoint; after
# that many, training has moved them to its activations' own.
STATS_WARM_STEPS = 50
STATS_BATCHES = 20  # batches of a re-estimate: 0.9**20, 12 % of the statistics before it, is left


def stats_batches(steps: int) -> int:
    """Batches of the BatchNorm re-estimate a run needs if it ends after `steps` steps (0: none)."""
    return min(STATS_BATCHES, steps) if 0 < steps < STATS_WARM_STEPS else 0


def refresh_batch_stats(
    net: gluon.HybridBlock, inputs: Callable[[], list[tuple[mx.nd.NDArray, ...]]], batches: int = STATS_BATCHES
) -> None:
    """Re-estimate BatchNorm's running statistics with the current weights, on training batches (`inputs`:
    the net's arguments, per device), without a weight update.

    Why: a run of a few steps keeps running statistics near their start while its activations are far from
    it. In inference its ReLU6s then saturate, and every image gets the same score (a classifier trained
    for six steps gave 0.4128 on every one): a model that ranks nothing, calibrated right at its one score.
    MXNet moves running statistics in the backward pass, not the forward one: each batch goes through both
    (the gradients are overwritten by the next training step; no trainer step is taken here).
    """
    for _ in range(batches):
        with autograd.record(train_mode=True):
            outs = [net(*args) for args in inputs()]
            # the first output (logits, reconstruction, class scores) depends on every BatchNorm
            heads = [(out[0] if isinstance(out, list | tuple) else out).sum() for out in outs]
        autograd.backward(heads)
    mx.nd.waitall()


def run_loop(
    name: str,
    opts: TrainOptions,
    trainer: gluon.Trainer,
    step: Callable[[bool], float],
    validate: Callable[[], float],
    checkpoint: Callable[..., object],
    clock: TrainClock | None = None,
    history: list[dict[str, float]] | None = None,
    average: WeightAverage | None = None,
    refresh_stats: Callable[[int], None] | None = None,
) -> tuple[list[dict[str, float]], float]:
    """Epoch loop with tqdm progress; per-epoch mean train loss and validation loss.

    Ends after `opts.epochs` epochs (counting resumed ones) or when the clock's budget is used up, in
    the middle of an epoch if need be (that epoch is recorded as partial). After every epoch the run
    folder is complete (weights, record, optimiser state): it can be built from, or resumed. With an
    `average`, it is updated after every step, and validation and the saved model use it. `refresh_stats(n)`
    re-estimates BatchNorm's running statistics on n batches (`refresh_batch_stats`) before the last
    validation of a run that took fewer than STATS_WARM_STEPS steps (an earlier checkpoint of such a run keeps
    stale ones). A re-estimate batch costs about a training step (forward and backward), so the budget keeps
    back n times the median step time of this session: a tight budget ends training earlier, and holds.
    """
    clock = clock or TrainClock(opts.minutes * 60 if opts.minutes else None)
    history = list(history or [])
    stopped = "epochs"
    if len(history) >= opts.epochs or clock.over():
        logger.info("%s: run already complete (%d epochs, %.0f s)", name, len(history), clock.used())
        return history, clock.used()
    step_times: list[float] = []  # this session's steps while short of STATS_WARM_STEPS: a re-estimate's cost
    for epoch in range(len(history) + 1, opts.epochs + 1):
        losses = []
        bar = tqdm(
            range(opts.iters_per_epoch),
            desc=f"{name} epoch {epoch}/{opts.epochs}",
            unit="it",
            leave=False,
            disable=None,
        )
        for _ in bar:
            started = time.perf_counter()
            losses.append(step(True))
            if average is not None:
                average.update(trainer.optimizer.num_update)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            # only a run still short of STATS_WARM_STEPS would need a re-estimate: only then is time kept back
            batches = stats_batches(trainer.optimizer.num_update) if refresh_stats is not None else 0
            if batches:
                step_times.append(time.perf_counter() - started)
            if clock.over(batches * float(np.median(step_times)) if batches else 0.0):
                stopped = "budget"
                break
        train_loss = float(np.mean(losses))
        if not np.isfinite(train_loss):
            raise ExportError(f"{name}: training diverged at epoch {epoch} (loss {train_loss})")
        # A usable run folder after every epoch: long runs can be built from before they end. With an average,
        # raw.params keeps the trained weights, and validation and model.params use the average (one swap).
        if average is not None:
            average.save_raw(opts.out)
        else:  # a run once trained with --ema goes on without: its raw.params would be stale from now on
            (opts.out / RAW_PARAMS_FILE).unlink(missing_ok=True)
        with average.applied() if average is not None else nullcontext():
            batches = stats_batches(trainer.optimizer.num_update)
            if refresh_stats is not None and batches and (stopped == "budget" or epoch == opts.epochs):
                refresh_stats(batches)
            val_loss = validate()
            history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
            seconds = clock.used()
            cut = stopped == "budget"
            partial_note = f" (partial: {len(losses)}/{opts.iters_per_epoch} it, budget used)" if cut else ""
            tqdm.write(
                f"{name} epoch {epoch}/{opts.epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f} "
                f"({seconds:.0f} s){partial_note}"
            )
            checkpoint(history, seconds, stopped=stopped)
        _save_trainer(trainer, opts.out)
        if stopped == "budget":
            if epoch == 1 and len(losses) < opts.iters_per_epoch:
                logger.warning(
                    "%s: the budget of %.1f min held only %d of %d iterations of one epoch: the model is "
                    "barely trained; give more --minutes or fewer --iters",
                    name,
                    (clock.budget_s or 0) / 60,
                    len(losses),
                    opts.iters_per_epoch,
                )
            break
    return history, clock.used()


def _save_trainer(trainer: gluon.Trainer, out: Path) -> None:
    tmp = out / (TRAINER_FILE + ".tmp")
    trainer.save_states(str(tmp))
    os.replace(tmp, out / TRAINER_FILE)


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
    stopped: str = "epochs",
    simulation: dict[str, Any] | None = None,
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
            "sim_px_per_mm": list(SimConfig.chosen(opts.sim_px_per_mm).px_per_mm),
            "sim_flat": opts.sim_flat,
            "sim_edges": opts.sim_edges,
            "imagenet": opts.imagenet,
            "imagenet_weights": imagenet_provenance(opts.imagenet) if opts.imagenet else None,
            "zoom": list(opts.zoom),
            "planned_epochs": opts.epochs,
            "minutes": opts.minutes,
            "ema": opts.ema,
            "simulation": simulation,  # what the simulator drew on (SimulatedTiles.summary), None: off
            "stopped_by": stopped,
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
