"""Agent latency and throughput against a bare ONNX Runtime loop over the same models.

Measures, on this machine, with one model bundle and a folder of images:

1. per-stage latency of `InferenceEngine.predict` (decode measured apart): median, p99, mean;
2. the engine's I/O binding against plain `session.run` inside the engine, interleaved;
3. the full agent pipeline (replay source -> Pipeline -> JSONL sink) in frames/s and end-to-end latency;
4. a bare `session.run` loop over the same models with the same pre-built tile batches, in frames/s;
5. the ratio agent fps / bare fps, from alternating rounds so background load hits both alike.

Run: `python benchmarks/agent_latency.py --bundle BUNDLE --images DIR [--frames 200] [--json OUT]`.
Absolute figures depend on the machine and its load; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from lineside.agent.config import QueueConfig
from lineside.agent.imaging import decode_image
from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.preprocess import BatchBuilder, layout_for, windowed
from lineside.agent.inference.providers import resolve_providers
from lineside.agent.pipeline import Pipeline
from lineside.agent.results import Frame, InspectionResult
from lineside.agent.sinks.base import Sink
from lineside.agent.sinks.jsonl import JsonlSink
from lineside.agent.sources import ReplaySourceConfig
from lineside.agent.sources.replay import ReplaySource

STAGES = ("decode", "preprocess", "classifier", "classifier_post", "vae", "vae_post", "ssd", "ssd_post", "decide")
SUFFIXES = (".png", ".tif", ".tiff")


# -- helpers ---------------------------------------------------------------------------------------


def summarise(values: list[float]) -> dict[str, float]:
    """Median, p99, mean, min and count of a list of milliseconds."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "n": int(a.size),
    }


def find_images(root: Path) -> list[Path]:
    """PNG and TIFF files under `root`, recursively, in name order."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def machine_info() -> dict[str, Any]:
    """CPU, cores, RAM, OS and library versions."""
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "ram_gib": ram_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "onnxruntime": ort.__version__,
        "ort_available_providers": ort.get_available_providers(),
        "load_average_start": list(os.getloadavg()),
    }


class RecordingSink(Sink):
    """A non-durable sink that keeps each result's end-to-end latency (capture to result)."""

    name = "benchmark-recorder"
    durable = False

    def __init__(self) -> None:
        self.totals: list[float] = []
        self.errors = 0

    def publish(self, result: InspectionResult, frame: Frame) -> None:
        self.totals.append(result.latency_ms["total"])
        self.errors += result.error is not None


# -- measurements ----------------------------------------------------------------------------------


def set_io_binding(engine: InferenceEngine, on: bool) -> None:
    """Make every runner of the engine use I/O binding (`on`) or plain session.run."""
    engine.io_binding = on


def stage_latency(engine: InferenceEngine, images: list[np.ndarray], blobs: list[bytes], frames: int) -> dict:
    """Per-stage ms of `predict` over `frames` frames cycling through the images; decode timed apart."""
    samples: dict[str, list[float]] = {s: [] for s in (*STAGES, "total")}
    for i in range(frames):
        k = i % len(images)
        t0 = time.perf_counter()
        decode_image(blobs[k])
        t1 = time.perf_counter()
        prediction = engine.predict(images[k])
        t2 = time.perf_counter()
        samples["decode"].append((t1 - t0) * 1000)
        for stage in STAGES[1:]:
            if stage in prediction.timings_ms:
                samples[stage].append(prediction.timings_ms[stage])
        samples["total"].append((t2 - t1) * 1000)
    return {stage: summarise(v) for stage, v in samples.items() if v}


def binding_comparison(engine: InferenceEngine, images: list[np.ndarray], frames: int) -> dict:
    """predict() total ms with I/O binding vs plain session.run: both on every frame, order alternating."""
    results: dict[str, list[float]] = {"io_binding": [], "session_run": []}
    default = engine.io_binding
    try:
        for i in range(frames):
            modes = ("io_binding", "session_run") if i % 2 == 0 else ("session_run", "io_binding")
            for mode in modes:
                set_io_binding(engine, mode == "io_binding")
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


def models_share(stages: dict, kinds: Any) -> float:
    """Fraction of the mean predict() time spent inside ONNX Runtime (the model stages)."""
    return sum(stages[k]["mean"] for k in kinds if k in stages) / stages["total"]["mean"]


class BareBaseline:
    """Plain ONNX Runtime sessions over the bundle's models and pre-built batches: the floor to beat."""

    def __init__(self, engine: InferenceEngine, providers: list, images: list[np.ndarray], threads: int) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # the engine's own sessions already logged any graph warnings
        self.sessions: list[tuple[ort.InferenceSession, str]] = []
        self.batches: list[list[np.ndarray]] = [[] for _ in images]
        self.tiles: dict[str, int] = {}
        for kind, spec in engine.manifest.models.items():
            path = engine.bundle.path(spec.file)
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            self.sessions.append((session, spec.input.name))
            builder = BatchBuilder(spec.preprocessing)
            for k, image in enumerate(images):
                layout = layout_for(image.shape, spec.preprocessing)
                batch = builder.build(windowed(image, spec.preprocessing), layout).copy()
                self.batches[k].append(batch)
                self.tiles[kind] = batch.shape[0]
        self.run(len(images))  # warm up every batch shape

    def run(self, frames: int) -> float:
        """Run `frames` frames (every model once each); returns seconds."""
        start = time.perf_counter()
        for i in range(frames):
            for (session, name), batch in zip(self.sessions, self.batches[i % len(self.batches)], strict=True):
                session.run(None, {name: batch})
        return time.perf_counter() - start


def pipeline_round(engine: InferenceEngine, replay_dir: Path, frames: int, out_dir: Path) -> dict:
    """One run of the real pipeline over `frames` replayed frames at full speed; fps and latency."""
    config = ReplaySourceConfig(kind="replay", path=replay_dir, rate_hz=0.0, loop=True, max_frames=frames)
    recorder = RecordingSink()
    fd, name = tempfile.mkstemp(suffix=".jsonl", dir=out_dir)
    os.close(fd)
    jsonl = JsonlSink(name)
    pipeline = Pipeline(ReplaySource(config), engine, [jsonl, recorder], QueueConfig())
    start = time.perf_counter()
    pipeline.start()
    try:
        if not pipeline.wait(timeout=3600):
            raise RuntimeError("pipeline did not finish")
        seconds = time.perf_counter() - start
    finally:
        pipeline.stop()
        os.unlink(name)
    if len(recorder.totals) != frames or recorder.errors:
        raise RuntimeError(f"pipeline produced {len(recorder.totals)} results ({recorder.errors} errors) for {frames}")
    return {"seconds": seconds, "fps": frames / seconds, "totals": recorder.totals, "stats": pipeline.stats()}


def interleaved(
    engine: InferenceEngine, bare: BareBaseline, replay_dir: Path, frames: int, rounds: int, out_dir: Path
) -> dict:
    """Alternating rounds of bare session.run and the agent pipeline, `frames` each; per-round fps and ratio.

    Short rounds in alternating order (bare-agent, agent-bare, ...) let both sides see the same load.
    """
    rows = []
    totals: list[float] = []
    for r in range(rounds):
        order: list[tuple[str, Callable[[], Any]]] = [
            ("bare", lambda: bare.run(frames)),
            ("agent", lambda: pipeline_round(engine, replay_dir, frames, out_dir)),
        ]
        if r % 2:
            order.reverse()
        row: dict[str, float] = {}
        for label, fn in order:
            result = fn()
            if label == "bare":
                row["bare_fps"] = frames / result
            else:
                row["agent_fps"] = result["fps"]
                totals += result["totals"]
        row["ratio"] = row["agent_fps"] / row["bare_fps"]
        row["load_1min"] = os.getloadavg()[0]
        rows.append(row)
        print(
            f"  round {r + 1}/{rounds}: bare {row['bare_fps']:.2f} fps, agent {row['agent_fps']:.2f} fps, "
            f"ratio {row['ratio']:.3f} (load {row['load_1min']:.1f})",
            flush=True,
        )
    return {
        "frames_per_round": frames,
        "rounds": rows,
        "bare_fps_median": statistics.median(r["bare_fps"] for r in rows),
        "agent_fps_median": statistics.median(r["agent_fps"] for r in rows),
        "ratio_median": statistics.median(r["ratio"] for r in rows),
        "ratio_min": min(r["ratio"] for r in rows),
        "ratio_max": max(r["ratio"] for r in rows),
        "end_to_end_ms": summarise(totals),
    }


# -- report ----------------------------------------------------------------------------------------


def print_report(report: dict) -> None:
    """A readable summary of `report`."""
    m, b = report["machine"], report["bundle"]
    print("\n== machine")
    print(f"cpu            {m['cpu']} ({m['logical_cores']} logical, {m['usable_cores']} usable), {m['ram_gib']} GiB")
    print(f"os / python    {m['os']} / {m['python']}")
    print(f"libraries      numpy {m['numpy']}, opencv {m['opencv']}, onnxruntime {m['onnxruntime']}")
    available = ", ".join(m["ort_available_providers"])
    print(f"providers      in use {', '.join(b['providers_in_use'])} (available {available})")
    print(f"load average   start {m['load_average_start'][0]:.2f}, end {m['load_average_end'][0]:.2f}")
    print("\n== bundle and images")
    print(f"bundle         {b['bundle_id']} version {b['version']}")
    tiles = ", ".join(f"{k} {n} x {b['input_sizes'][k]}" for k, n in b["tiles"].items())
    print(f"images         {report['images']['count']} images, {report['images']['sizes']}; tiles/frame: {tiles}")
    print(
        f"frames         {report['frames']} per measurement, {report['warmup']} warm-up, "
        f"{report['rounds']} throughput rounds of {report['throughput']['frames_per_round']} frames each side"
    )
    print("\n== predict() stages, ms (decode measured apart)")
    print(f"{'stage':<16}{'median':>10}{'p99':>10}{'mean':>10}")
    for stage, s in report["stages_ms"].items():
        print(f"{stage:<16}{s['median']:>10.2f}{s['p99']:>10.2f}{s['mean']:>10.2f}")
    print(
        f"ONNX Runtime share of predict() (means): {report['models_share_of_predict']:.1%}; the rest is "
        "pre/post-processing and the decision"
    )
    c = report["io_binding_vs_session_run"]
    print("\n== inside the engine: I/O binding vs plain session.run (predict total ms, interleaved)")
    for mode in ("io_binding", "session_run"):
        print(f"{mode:<16}{c[mode]['median']:>10.2f}{c[mode]['p99']:>10.2f}{c[mode]['mean']:>10.2f}")
    print(
        f"session_run / io_binding, median of per-frame pairs: {c['session_run_over_io_binding_median']:.3f}; ", end=""
    )
    print(f"engine default here: {c['engine_default']}")
    t = report["throughput"]
    print("\n== throughput (interleaved rounds)")
    print(f"bare session.run  {t['bare_fps_median']:.2f} frames/s (median of rounds)")
    print(f"agent pipeline    {t['agent_fps_median']:.2f} frames/s (median of rounds)")
    print(f"ratio agent/bare  {t['ratio_median']:.3f} median (min {t['ratio_min']:.3f}, max {t['ratio_max']:.3f})")
    e = t["end_to_end_ms"]
    print(f"agent end-to-end  median {e['median']:.1f} ms, p99 {e['p99']:.1f} ms (capture to result, queue included)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="Model bundle folder.")
    parser.add_argument("--images", type=Path, required=True, help="Folder of images (*.png, *.tif), recursive.")
    parser.add_argument("--frames", type=int, default=200, help="Frames per measurement (default 200).")
    parser.add_argument("--warmup", type=int, default=10, help="Warm-up frames before measuring (default 10).")
    parser.add_argument(
        "--rounds", type=int, default=10, help="Alternating bare/agent rounds sharing --frames frames (default 10)."
    )
    parser.add_argument("--providers", default="cpu", help="Comma-separated: cpu, cuda, tensorrt (default cpu).")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads, 0 = ORT default.")
    parser.add_argument("--json", type=Path, help="Also write the figures as JSON here.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    paths = find_images(args.images)
    if not paths:
        parser.error(f"no *.png/*.tif images under {args.images}")
    blobs = [p.read_bytes() for p in paths]
    images = [decode_image(b, str(p)) for b, p in zip(blobs, paths, strict=True)]
    machine = machine_info()
    names = [n.strip() for n in args.providers.split(",") if n.strip()]
    engine = InferenceEngine.load(args.bundle, providers=names, intra_op_threads=args.threads)
    entries = resolve_providers(names).entries

    print(f"warming up ({args.warmup} frames) ...", flush=True)
    for i in range(args.warmup):
        engine.predict(images[i % len(images)])
    print(f"predict() stages over {args.frames} frames ...", flush=True)
    stages = stage_latency(engine, images, blobs, args.frames)
    print("I/O binding vs session.run inside the engine ...", flush=True)
    binding = binding_comparison(engine, images, args.frames)
    bare = BareBaseline(engine, entries, images, args.threads)

    with tempfile.TemporaryDirectory(prefix="lineside-bench-") as tmp:
        # The replay source reads one flat folder; link the images into one.
        replay_dir = Path(tmp) / "images"
        replay_dir.mkdir()
        for i, p in enumerate(paths):
            (replay_dir / f"{i:05d}_{p.name}").symlink_to(p.resolve())
        pipeline_round(engine, replay_dir, max(args.warmup, len(paths)), Path(tmp))  # warm-up
        per_round = max(1, args.frames // args.rounds)
        print(f"throughput: {args.rounds} alternating rounds of {per_round} frames each side ...", flush=True)
        throughput = interleaved(engine, bare, replay_dir, per_round, args.rounds, Path(tmp))

    machine["load_average_end"] = list(os.getloadavg())
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine,
        "bundle": {
            "bundle_id": engine.manifest.bundle_id,
            "version": engine.manifest.version,
            "providers_in_use": engine.providers_in_use,
            "tiles": bare.tiles,
            "input_sizes": {k: list(s.preprocessing.input_size) for k, s in engine.manifest.models.items()},
        },
        "images": {"count": len(images), "sizes": sorted({f"{im.shape[1]}x{im.shape[0]} {im.dtype}" for im in images})},
        "frames": args.frames,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "stages_ms": stages,
        "models_share_of_predict": models_share(stages, engine.manifest.models),
        "io_binding_vs_session_run": binding,
        "throughput": throughput,
    }
    print_report(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
