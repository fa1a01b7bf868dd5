"""`predict` latency under several ONNX Runtime session settings, frames interleaved across them.

Each frame runs on every engine in turn (the order rotating), so background load hits all alike. The
first setting is the reference for the per-frame ratios. Settings are written THREADS[:spin][:all]
(`:spin` allows spinning, `:all` runs every model on every frame, i.e. skip_unneeded_models off), e.g.
`2:spin:all` is ONNX Runtime's own default on a 2-core box as the engine ran it before issue 11. A setting
may end in `@BUNDLE` to run another bundle than `--bundle` (e.g. its INT8 copy from `lineside-export quantize`),
so two bundles are compared frame by frame: `0:all 0:all@/path/int8`.

Run: `python benchmarks/session_settings.py --bundle B [--images DIR] --frames 60 2:spin:all 1 2`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from lineside.agent.bench import BenchOptions, load_frames, machine_info, summarise
from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.settings import SessionSettings


def engine_for(bundle: Path, spec: str) -> InferenceEngine:
    """An engine for a THREADS[:spin][:all][@BUNDLE] setting."""
    spec, _, other = spec.partition("@")
    bundle = Path(other) if other else bundle
    threads, *flags = spec.split(":")
    settings = SessionSettings(intra_op_threads=int(threads), allow_spinning="spin" in flags)
    return InferenceEngine.load(
        bundle, providers=["cpu"], session=settings, skip_unneeded_models="all" not in flags, verify_golden=False
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--images", type=Path, help="Folder of images; default: golden images tiled to 768x572.")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument(
        "--good-frames",
        action="store_true",
        help="Raise the decision models' image thresholds to their upper bound: every frame is judged good "
        "(the common case on a line), so localisers that only report boxes are skipped.",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("settings", nargs="+", help="THREADS[:spin][:all], the first one the reference.")
    args = parser.parse_args(argv)
    machine = machine_info()
    engines = {spec: engine_for(args.bundle, spec) for spec in args.settings}
    first = engines[args.settings[0]]
    if args.good_frames:
        for engine in engines.values():
            thresholds = engine.thresholds()
            engine.set_threshold_overrides(
                {
                    kind: thresholds[kind].model_copy(update={"image": thresholds[kind].bounds()["image"][1]})
                    for kind in engine.manifest.decision.defective_if_any
                }
            )
    images, _, origin = load_frames(BenchOptions(bundle=args.bundle, images=args.images), first)
    for engine in engines.values():  # warm-up
        for image in images[:2]:
            engine.predict(image)
    samples: dict[str, list[float]] = {spec: [] for spec in args.settings}
    per_model: dict[str, dict[str, list[float]]] = {spec: {} for spec in args.settings}
    for i in range(args.frames):
        shift = i % len(args.settings)
        for spec in args.settings[shift:] + args.settings[:shift]:
            t0 = time.perf_counter()
            prediction = engines[spec].predict(images[i % len(images)])
            samples[spec].append((time.perf_counter() - t0) * 1000)
            for kind in prediction.model_scores:  # the models that ran on this frame
                per_model[spec].setdefault(kind, []).append(prediction.timings_ms[kind])
    machine["load_average_end"] = list(os.getloadavg())
    ref = np.asarray(samples[args.settings[0]])
    report = {
        "machine": machine,
        "frames": args.frames,
        "images": origin,
        "good_frames": args.good_frames,
        "settings": {
            spec: {
                **summarise(v),
                "ratio_to_first": float(np.median(np.asarray(v) / ref)),
                "model_median_ms": {kind: float(np.median(t)) for kind, t in per_model[spec].items()},
            }
            for spec, v in samples.items()
        },
    }
    print(
        f"{machine['cpu']}, {machine['usable_cores']} usable cores; load {machine['load_average_start'][0]:.2f} "
        f"-> {machine['load_average_end'][0]:.2f}; {args.frames} frames from {origin}"
    )
    print(f"{'setting':<14}{'median ms':>10}{'p99 ms':>10}{'ratio':>8}  model medians (ms)")
    for spec, s in report["settings"].items():
        models = ", ".join(f"{k} {v:.1f}" for k, v in s["model_median_ms"].items())
        print(f"{spec:<14}{s['median']:>10.1f}{s['p99']:>10.1f}{s['ratio_to_first']:>8.3f}  {models}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    for engine in engines.values():
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
