"""`lineside-export`: synth, train-all, train-vae, train-ssd, train-classifier, build, evaluate, simulate-preview,
keygen, publish, quantize, bench-mxnet."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from lineside.agent.errors import EXIT_FAILURE, LinesideError
from lineside.export.data import datasets_for

logger = logging.getLogger("lineside.export")


def _gpus(text: str) -> list[int]:
    try:
        return [int(g) for g in text.split(",") if g.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--gpus expects a list like 0,1; got {text!r}") from err


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--size expects HxW like 572x768; got {text!r}") from err
    return h, w


def _decay(text: str) -> float:
    """A decay in [0, 1) (0: off); a clear error otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ema expects a decay such as 0.999 (or 0: off), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"--ema expects a decay in [0, 1), e.g. 0.999, got {text!r}")
    return value


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--minutes expects a positive number, got {text!r}") from err
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--minutes expects a positive number, got {text!r}")
    return value


def _post_override(text: str) -> tuple[str, str, Any]:
    target, sep, raw = text.partition("=")
    kind, dot, name = target.partition(".")
    if not sep or not dot or not kind or not name:
        raise argparse.ArgumentTypeError(f"--post expects KIND.FIELD=VALUE, e.g. vae.part_mask=false; got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare word: let the field's validation decide
    return kind, name, value


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from err
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _train(args: argparse.Namespace, kind: str) -> int:
    from lineside.export.models import EXPORT_KINDS
    from lineside.export.train import TrainOptions

    _, train, val, _test, split = datasets_for(args.data, args.split)
    opts = TrainOptions(
        out=Path(args.out),
        epochs=args.epochs,
        seed=args.seed,
        gpus=args.gpus,
        batch_size=args.batch_size,
        iters_per_epoch=args.iters,
        learning_rate=args.lr,
        preset=getattr(args, "preset", None),
        pretrained=getattr(args, "pretrained", False),
        init_from=Path(args.init_from) if getattr(args, "init_from", None) else None,
        simulate=getattr(args, "simulate", 0.0),
        copy_paste=getattr(args, "copy_paste", 0.0),
        sim_px_per_mm=getattr(args, "sim_px_per_mm", None),
        sim_flat=getattr(args, "sim_flat", 0.0),
        sim_edges=getattr(args, "sim_edges", 0.0),
        imagenet=getattr(args, "imagenet", None),
        zoom=getattr(args, "zoom", None) or (1.0, 1.0),
        minutes=args.minutes,
        ema=args.ema,
        resume=args.resume,
    )
    out = EXPORT_KINDS[kind].train(train, val, opts, split)
    print(f"{kind} trained: {out}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from lineside.export.synth import generate

    summary = generate(
        Path(args.out),
        args.images,
        args.seed,
        size=args.size,
        bit_depth=args.bit_depth,
        defect_free_share=args.defect_free_share,
        defect_contrast=args.defect_contrast,
    )
    print(summary.model_dump_json(indent=2))
    return 0


def cmd_simulate_preview(args: argparse.Namespace) -> int:
    from lineside.export.simulate_preview import render_preview

    _, train, _val, _test, _split = datasets_for(args.data, args.split)
    from lineside.export.simulate import SimConfig

    config = SimConfig.chosen(args.sim_px_per_mm, args.sim_flat, args.sim_edges)
    sheet = render_preview(
        train, Path(args.out), count=args.count, seed=args.seed, crop=args.crop, zoom=args.zoom, config=config
    )
    print(f"preview written: {sheet.path} (holds dataset pixels: keep it out of the repository)")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from lineside.export.build import BuildOptions, build_bundle, dataset_summary
    from lineside.export.models import EXPORT_KINDS

    kinds = list(EXPORT_KINDS)
    dataset, train, val, test, _split = datasets_for(args.calib, args.split)
    calib = val if val.samples else dataset

    summary = dataset_summary(dataset, train, val, test)
    overrides: dict[str, dict[str, Any]] = {}
    for kind, name, value in args.post:
        overrides.setdefault(kind, {})[name] = value
    out = build_bundle(
        BuildOptions(
            out=Path(args.out),
            calib=calib,
            runs={kind: Path(run) for kind in kinds if (run := getattr(args, kind))},
            version=args.version,
            force=args.force,
            dataset_summary=summary,
            target_recall=args.target_recall,
            post_overrides=overrides,
        )
    )
    print(f"bundle written: {out} and {out}.tar.gz")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lineside.export.evaluate import evaluate_bundle
    from lineside.export.metrics import format_table

    _, _train, _val, test, _split = datasets_for(args.data, args.split)
    if args.all:
        from lineside.export.data import open_dataset

        test = open_dataset(args.data)
    report = evaluate_bundle(Path(args.bundle), test, providers=args.providers.split(","))
    print(
        f"bundle {report['bundle_version']} on {report['images']} test images "
        f"({report['defective_images']} defective) from groups {', '.join(report['test_groups'])}"
    )
    print(f"decision rule: defective if any of {report['decision_rule']} fires")
    print(format_table(report["methods"]))
    point, auroc = report["operating_point"], report["auroc"]
    print(
        f"operating point: image recall {point['recall']:.3f}, false alarms {point['false_alarm_rate']:.3f} of "
        f"normal images, {point['false_boxes_per_normal_image']:.2f} false boxes per normal image, box recall "
        f"@IoU.25 {point['box_recall_iou25']:.3f}; flag-everything image F1 {point['flag_everything_image_f1']:.3f}"
    )
    print("AUROC: " + ", ".join(f"{k} {'-' if v is None else format(v, '.3f')}" for k, v in auroc.items()))
    print(f"{'per series':<12}{'images':>7}{'defective':>10}{'recall':>8}{'false al.':>10}{'AUROC':>7}{'avg F1':>8}")
    for group, g in report["per_group"].items():
        cells = [g[k] for k in ("recall", "false_alarm_rate", "auroc", "avg_f1")]
        shown = "".join(
            f"{'-' if v is None else format(v, '.3f'):>{w}}" for v, w in zip(cells, (8, 10, 7, 8), strict=True)
        )
        print(f"{group:<12}{g['images']:>7}{g['defective']:>10}{shown}")
    print(
        f"latency per image (models + post-processing): median {report['latency_ms']['median']:.1f} ms, "
        f"p99 {report['latency_ms']['p99']:.1f} ms on {', '.join(report['providers'])}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    return 0


def cmd_bench_mxnet(args: argparse.Namespace) -> int:
    from lineside.agent.inference.settings import SessionSettings
    from lineside.export.bench_mxnet import bench_mxnet, format_report

    report = bench_mxnet(
        Path(args.bundle),
        Path(args.runs),
        Path(args.images) if args.images else None,
        frames=args.frames,
        settings=SessionSettings(intra_op_threads=args.threads),
    )
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_train_all(args: argparse.Namespace) -> int:
    from lineside.export.recipe import RecipeOptions, run_recipe

    report = run_recipe(
        RecipeOptions(
            data=args.data,
            out=Path(args.out),
            minutes=args.minutes,
            seed=args.seed,
            gpus=args.gpus,
            split=args.split,
            calib=args.calib,
            target_recall=args.target_recall,
        )
    )
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))
    print(f"bundle written: {report['bundle']} and {report['bundle']}.tar.gz; report: {args.out}/report.md")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from lineside.export.publish import keygen

    private, public = keygen(Path(args.out))
    print(f"private key: {private} (mode 0600: keep it on the release machine only)")
    print(f"public key:  {public} (copy to each station, updates.public_key)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from lineside.export.quantize import QuantizeOptions, quantize_bundle

    summary = quantize_bundle(
        QuantizeOptions(
            bundle=Path(args.bundle),
            out=Path(args.out),
            models=args.models,
            images=args.images,
            max_tiles=args.max_tiles,
            calibration=args.calibration,
            version=args.version,
            force=args.force,
            allow_golden_flips=args.allow_golden_flips,
        )
    )
    for flip in summary["golden_flips"]:
        print(f"warning: golden verdict flipped by INT8: {flip}", file=sys.stderr)
    for kind, q in summary["models"].items():
        diffs = ", ".join(f"{name} {value:.4g}" for name, value in q["max_abs_diff"].items())
        print(f"{kind}: INT8 on {q['tiles']} tiles; max |fp32 - int8|: {diffs}; image score {q['max_score_diff']:.4g}")
    print(
        f"verdicts: {summary['verdict_flips']} of {summary['frames']} calibration frames differ from the float32 "
        f"bundle ({summary['real_frames']} real); bundle {summary['version']} written: {args.out} and {args.out}.tar.gz"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from lineside.export.publish import publish

    # Read here, at run time, never at import: the same variable boto3 itself honours.
    endpoint = args.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
    pointer = publish(
        Path(args.bundle),
        args.to,
        args.channel,
        sign=Path(args.sign) if args.sign else None,
        endpoint_url=endpoint,
    )
    print(pointer.model_dump_json(indent=2))
    if pointer.signature is None:
        print("warning: published unsigned; agents with updates.public_key set will refuse it", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lineside-export", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic X-ray castings in the GDXray layout")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=_size, default=(572, 768), help="HxW, default 572x768")
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8)
    p.add_argument("--defect-free-share", type=float, default=0.3)
    p.add_argument("--defect-contrast", type=float, default=1.0, help="1.0 = GDXray-like; the demo uses 3")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("keygen", help="write an Ed25519 key pair that signs published bundles")
    p.add_argument("--out", required=True, help="folder for bundle-signing.key (0600) and bundle-signing.pub")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("publish", help="upload a bundle to S3 and point a channel at it (archive first, pointer last)")
    p.add_argument("--bundle", required=True, help="bundle folder or .tar.gz (verified before upload)")
    p.add_argument("--to", required=True, help="s3://bucket/prefix (the agents' s3.bucket and s3.prefix)")
    p.add_argument("--channel", required=True, help="canary, stable, or lower-case letters, digits and '-'")
    p.add_argument("--sign", help="private key from keygen; without it the pointer is unsigned")
    p.add_argument("--endpoint-url", help="S3-compatible store (MinIO...); default $AWS_ENDPOINT_URL or AWS")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser(
        "quantize",
        help="INT8 copy of a bundle (ONNX Runtime static quantisation; agent environment + quantize extra)",
    )
    p.add_argument("--bundle", required=True, help="the float32 bundle (folder or .tar.gz)")
    p.add_argument("--out", required=True, help="folder to write the INT8 bundle to (+ .tar.gz)")
    p.add_argument("--models", type=lambda t: [k for k in t.split(",") if k], help="e.g. ssd,vae (default: all)")
    p.add_argument(
        "--images", type=Path, action="append", default=[], metavar="PATH",
        help="radiographs of the line (files or folders; repeatable) to calibrate the activation ranges on, "
        "beside the bundle's golden images",
    )  # fmt: skip
    p.add_argument(
        "--max-tiles", type=int, default=64,
        help="calibration tiles per model (default 64; percentile and entropy need ~20 MB of memory per SSD tile)",
    )  # fmt: skip
    p.add_argument(
        "--calibration", choices=["minmax", "percentile", "entropy"], default="percentile",
        help="how activation ranges are set (default percentile; minmax needs little memory)",
    )  # fmt: skip
    p.add_argument("--version", help="version of the new bundle (default: the float32 one's + '-int8')")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--allow-golden-flips", action="store_true",
        help="write the bundle even when INT8 flips a golden image's verdict (recorded; judge it with evaluate)",
    )  # fmt: skip
    p.add_argument("--json", help="write the summary here")
    p.set_defaults(func=cmd_quantize)

    try:
        from lineside.export.models import EXPORT_KINDS  # imports MXNet
    except ImportError as err:  # the agent-only install: keygen, publish and synth still work
        parser.epilog = f"train-*, build and evaluate need the export extra (MXNet): {err}"
        return parser
    from lineside.export.models.base import parse_px_per_mm, parse_share

    for kind, handler in EXPORT_KINDS.items():
        p = sub.add_parser(f"train-{kind}", help=f"train the {kind} in MXNet Gluon")
        p.add_argument("--data", required=True, help="dataset folder, manifest or s3:// manifest")
        p.add_argument("--out", required=True, help="run folder to write")
        p.add_argument("--epochs", type=int, default=handler.default_epochs)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--gpus", type=_gpus, default=[], help="e.g. 0,1 (data parallel); CPU when empty")
        p.add_argument("--split", help="split JSON {train, val, test}: group names")
        p.add_argument("--batch-size", type=int, default=16)
        p.add_argument("--iters", type=int, default=50, help="iterations per epoch")
        p.add_argument("--lr", type=float, default=1e-3)
        p.add_argument("--minutes", type=_minutes, help="wall-clock budget (all sessions of a resumed run together)")
        p.add_argument(
            "--ema", type=_decay, default=0.0, metavar="DECAY",
            help="save a moving average of the weights over the steps, e.g. 0.999 (default 0: the last weights)",
        )  # fmt: skip
        p.add_argument(
            "--resume", action="store_true", help="continue the run in --out (weights, optimiser, history, time)"
        )
        handler.add_arguments(p)
        p.set_defaults(func=lambda a, k=kind: _train(a, k))

    p = sub.add_parser(
        "train-all", help="the recipe: split, train the three models in a budget, build, evaluate, report"
    )
    p.add_argument("--data", required=True, help="dataset folder, manifest or s3:// manifest")
    p.add_argument("--out", required=True, help="recipe folder (runs, bundle, report); run again to resume")
    p.add_argument("--minutes", type=_minutes, default=150.0, help="wall-clock budget for the whole recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpus", type=_gpus, default=[], help="e.g. 0,1 (data parallel); CPU when empty")
    p.add_argument("--split", help="split JSON {train, val, test}: group names (default: by series/part)")
    p.add_argument("--calib", help="a separate data set to calibrate on, instead of the validation series")
    p.add_argument("--target-recall", type=_share, default=0.98, help="image recall of the operating point")
    p.set_defaults(func=cmd_train_all)

    p = sub.add_parser("simulate-preview", help="PNG grid: simulated defects beside real training defects")
    p.add_argument("--data", required=True)
    p.add_argument("--split", help="split JSON; only its train groups are used")
    p.add_argument("--out", required=True, help="PNG to write (outside the repository: it holds dataset pixels)")
    p.add_argument("--count", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crop", type=int, default=64, help="window around each defect, px (default 64)")
    p.add_argument("--zoom", type=int, default=3, help="pixel enlargement of each window (default 3)")
    p.add_argument("--sim-px-per-mm", type=parse_px_per_mm, metavar="MIN,MAX", help="as for train-ssd")
    p.add_argument("--sim-flat", type=parse_share, default=0.0, metavar="SHARE", help="as for train-ssd")
    p.add_argument("--sim-edges", type=parse_share, default=0.0, metavar="SHARE", help="as for train-ssd")
    p.set_defaults(func=cmd_simulate_preview)

    p = sub.add_parser("build", help="export ONNX with parity checks, calibrate, pack a bundle")
    for kind in EXPORT_KINDS:
        p.add_argument(f"--{kind}", help=f"run folder of a trained {kind}")
    p.add_argument("--calib", required=True, help="dataset whose validation split calibrates thresholds")
    p.add_argument("--split", help="split JSON; calibration uses its val groups")
    p.add_argument("--out", required=True, help="bundle folder to write (a .tar.gz is written beside it)")
    p.add_argument("--version")
    p.add_argument("--force", action="store_true", help="replace an existing bundle folder")
    p.add_argument(
        "--target-recall",
        type=_share,
        default=0.98,
        help="image recall the decision must reach on validation, at the fewest false alarms (default 0.98)",
    )
    p.add_argument(
        "--post",
        type=_post_override,
        action="append",
        default=[],
        metavar="KIND.FIELD=VALUE",
        help="override a post-processing field (a lever to measure), e.g. vae.part_mask=false; repeatable",
    )
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("evaluate", help="score a bundle on test images through ONNX Runtime")
    p.add_argument("--bundle", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", help="split JSON; evaluation uses its test groups")
    p.add_argument("--all", action="store_true", help="evaluate on every annotated image, ignoring the split")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--providers", default="cpu")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "bench-mxnet", help="latency: the bundle in ONNX Runtime vs the same weights hybridized in MXNet, same tiles"
    )
    p.add_argument("--bundle", required=True)
    p.add_argument("--runs", required=True, help="folder holding the bundle's run folders: classifier/, vae/, ssd/")
    p.add_argument("--images", help="folder of images; default: the bundle's golden images tiled to 768x572")
    p.add_argument("--frames", type=int, default=20, help="frames measured on each side (default 20)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads; 0 = the agent's auto")
    p.add_argument("--json", help="write the figures here")
    p.set_defaults(func=cmd_bench_mxnet)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except LinesideError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
