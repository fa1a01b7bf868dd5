"""I/O binding against plain `session.run` inside the engine, beside `lineside-agent bench`'s figures.

The measurements themselves (stages, pipeline vs bare ONNX Runtime, machine, memory) live in
`lineside.agent.bench`, behind `lineside-agent bench`; this script adds the one comparison that needs
the engine's internals: `predict` with the engine's I/O binding into reused output buffers vs plain
`session.run`, both on every frame, order alternating.

Run: `python benchmarks/agent_latency.py --bundle BUNDLE [--images DIR] [--frames 100] [--json OUT]`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from lineside.agent.bench import BenchOptions, format_report, load_frames, run_bench, summarise
from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.settings import SessionSettings


def binding_comparison(engine: InferenceEngine, images: list[np.ndarray], frames: int) -> dict[str, Any]:
    """predict() total ms with I/O binding vs plain session.run: both on every frame, order alternating."""
    results: dict[str, list[float]] = {"io_binding": [], "session_run": []}
    default = engine.io_binding
    try:
        for i in range(frames):
            modes = ("io_binding", "session_run") if i % 2 == 0 else ("session_run", "io_binding")
            for mode in modes:
                engine.io_binding = mode == "io_binding"
                t0 = time.perf_counter()
                engine.predict(images[i % len(images)])
                results[mode].append((time.perf_counter() - t0) * 1000)
    finally:
        engine.io_binding = default
    out: dict[str, Any] = {mode: summarise(v) for mode, v in results.items()}
    pairs = np.asarray(results["session_run"]) / np.asarray(results["io_binding"])
    out["session_run_over_io_binding_median"] = float(np.median(pairs))
    out["engine_default"] = "io_binding" if default else "session_run"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="Model bundle folder.")
    parser.add_argument("--images", type=Path, help="Folder of images (*.png, *.tif), recursive.")
    parser.add_argument("--frames", type=int, default=100, help="Frames per measurement (default 100).")
    parser.add_argument("--rounds", type=int, default=6, help="Alternating bare/agent rounds (default 6).")
    parser.add_argument("--providers", default="cpu", help="Comma-separated: cpu, cuda, tensorrt (default cpu).")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads, 0 = auto.")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    providers = [n.strip() for n in args.providers.split(",") if n.strip()]
    opts = BenchOptions(
        bundle=args.bundle,
        images=args.images,
        frames=args.frames,
        rounds=args.rounds,
        providers=providers,
        settings=SessionSettings(intra_op_threads=args.threads),
    )
    report = run_bench(opts)
    print(format_report(report))
    engine = InferenceEngine.load(args.bundle, providers=providers, session=opts.settings)
    try:
        images, _, _ = load_frames(opts, engine)
        print("I/O binding vs session.run inside the engine ...", flush=True)
        binding = binding_comparison(engine, images, args.frames)
    finally:
        engine.close()
    report["io_binding_vs_session_run"] = binding
    for mode in ("io_binding", "session_run"):
        print(f"{mode:<16}median {binding[mode]['median']:>8.2f}  p99 {binding[mode]['p99']:>8.2f}")
    print(f"session_run / io_binding, median of per-frame pairs: {binding['session_run_over_io_binding_median']:.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
