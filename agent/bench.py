"""`lineside-agent bench`: latency and throughput of a bundle on this machine, against bare ONNX Runtime.

1. per-stage latency of `InferenceEngine.predict` (decode timed apart): median, p99, mean;
2. the real pipeline (replay source -> queue -> engine -> a null sink) in frames/s, and in alternating
   rounds with it a bare `session.run` loop over the same models and input batches (the ceiling), so
   background load hits both alike; their ratio is the figure to read on a shared machine;
3. optionally (`--threads 1,2,...`) `predict` with each intra-op thread count, frames interleaved;
4. peak RSS, GPU memory (NVML, where a driver is), the providers in use, and the machine.

Without images, frames are made from the bundle's golden images, tiled at native resolution to
768x572 (the agent cannot import the export stage's synthesiser).
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort

from lineside.agent.imaging import decode_image, read_image
from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.preprocess import BatchBuilder, layout_for, windowed
from lineside.agent.inference.providers import resolve_providers
from lineside.agent.inference.settings import SessionSettings, usable_cores
from lineside.agent.nvml import Nvml
from lineside.agent.results import Frame, InspectionResult
from lineside.agent.sinks.base import Sink

STAGES = ("decode", "preprocess", "classifier", "classifier_post", "vae", "vae_post", "ssd", "ssd_post", "decide")
SUFFIXES = (".png", ".tif", ".tiff")
FRAME_SHAPE = (572, 768)  # (h, w) of a GDXray casting radiograph


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


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def rss_mb() -> float:
    """Resident set size of this process now, MiB (Linux; the peak where /proc is missing)."""
    return _proc_status_mb("VmRSS") or peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MiB."""
    # ru_maxrss is in kB on Linux (bytes on macOS, where VmHWM does not exist either).
    return _proc_status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_info() -> dict[str, Any] | None:
    """Driver version and per-GPU name and memory (MiB) from NVML; None without an NVIDIA driver."""
    nvml = Nvml()
    if not nvml.available:
        return None
    return {"driver": nvml.driver_version(), "devices": nvml.devices()}


def machine_info() -> dict[str, Any]:
    """CPU, cores, RAM, OS, GPU and library versions, and the load average now."""
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
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "ram_gib": ram_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "onnxruntime": ort.__version__,
        "ort_available_providers": ort.get_available_providers(),
        "gpu": gpu_info(),
        "load_average_start": list(os.getloadavg()),
    }


def golden_frames(engine: InferenceEngine, count: int = 8, shape: tuple[int, int] = FRAME_SHAPE) -> list[np.ndarray]:
    """`count` frames of `shape` tiled from the bundle's golden images at native resolution.

    Each frame is a mosaic of the golden images (flipped by turns, so frames differ), cropped to
    `shape`; an image larger than the frame is cropped.
    """
    golden = [read_image(engine.bundle.path(g.file)) for g in engine.manifest.golden]
    if not golden:
        raise ValueError("the bundle has no golden images; pass --images")
    h, w = shape
    frames = []
    for i in range(count):
        rows, y = [], 0
        k = i
        while y < h:
            row, x = [], 0
            while x < w:
                image = golden[k % len(golden)]
                image = image[:, ::-1] if (k // len(golden)) % 2 else image
                row.append(image)
                x += image.shape[1]
                k += 1
            height = min(t.shape[0] for t in row)
            rows.append(np.hstack([t[:height] for t in row])[:, :w])
            y += height
        frames.append(np.ascontiguousarray(np.vstack(rows)[:h]))
    return frames


class RecordingSink(Sink):
    """The null sink: keeps only each result's latency (capture to result, and the predict call)."""

    name = "bench-recorder"
    durable = False

    def __init__(self) -> None:
        self.totals: list[float] = []
        self.inference: list[float] = []
        self.errors = 0
        self.defective = 0
        self.last_at = 0.0  # perf_counter() when the latest result arrived

    def publish(self, result: InspectionResult, frame: Frame) -> None:
        self.last_at = time.perf_counter()
        self.totals.append(result.latency_ms["total"])
        self.inference.append(result.latency_ms.get("inference", 0.0))
        self.errors += result.error is not None
        self.defective += bool(result.is_defective)


# -- measurements ----------------------------------------------------------------------------------


def stage_latency(engine: InferenceEngine, images: list[np.ndarray], blobs: list[bytes], frames: int) -> dict:
    """Per-stage ms of `predict` over `frames` frames cycling through the images; decode timed apart.

    A stage skipped on a frame (a localiser on a good frame) is left out of that stage's figures;
    `models_run` counts the frames each model ran on.
    """
    samples: dict[str, list[float]] = {s: [] for s in (*STAGES, "total")}
    models_run = dict.fromkeys(engine.manifest.models, 0)
    defective = 0
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
        for kind in prediction.model_scores:
            models_run[kind] += 1
        defective += prediction.is_defective
    return {
        "stages_ms": {stage: summarise(v) for stage, v in samples.items() if v},
        "models_run": models_run,
        "defective_frames": defective,
    }


class BareBaseline:
    """Plain ONNX Runtime sessions over the bundle's models and pre-built batches: the ceiling.

    Same files, providers and session settings as the engine; no decode, pre- or post-processing. Each
    frame runs the models the engine runs on it (with `skip_unneeded_models`, those its decision
    rule needs for that frame), so both sides do the same model work.
    """

    def __init__(
        self, engine: InferenceEngine, providers: list, images: list[np.ndarray], settings: SessionSettings
    ) -> None:
        options = settings.session_options()
        options.log_severity_level = 3  # the engine's own sessions already logged any graph warnings
        self.calls: list[list[tuple[ort.InferenceSession, str, np.ndarray]]] = [[] for _ in images]
        # Every model and its batch per frame, whatever the engine ran (bench-mxnet compares them all).
        self.sessions: list[tuple[ort.InferenceSession, str]] = []
        self.batches: list[list[np.ndarray]] = [[] for _ in images]
        self.tiles: dict[str, int] = {}
        ran = [set(engine.predict(image).model_scores) for image in images]
        for kind, spec in engine.manifest.models.items():
            path = engine.bundle.path(spec.file)
            session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
            self.sessions.append((session, spec.input.name))
            builder = BatchBuilder(spec.preprocessing)
            for k, image in enumerate(images):
                layout = layout_for(image.shape, spec.preprocessing)
                batch = builder.build(windowed(image, spec.preprocessing), layout).copy()
                self.tiles[kind] = batch.shape[0]
                self.batches[k].append(batch)
                if kind in ran[k]:
                    self.calls[k].append((session, spec.input.name, batch))
        self.models_per_frame = statistics.mean(len(c) for c in self.calls)
        self.run(len(images))  # warm up every batch shape

    def run(self, frames: int) -> float:
        """Run `frames` frames (each frame's models once); returns seconds."""
        start = time.perf_counter()
        for i in range(frames):
            for session, name, batch in self.calls[i % len(self.calls)]:
                session.run(None, {name: batch})
        return time.perf_counter() - start


def pipeline_round(engine: InferenceEngine, replay_dir: Path, frames: int) -> dict:
    """One run of the real pipeline over `frames` replayed frames at full speed into the null sink."""
    # Imported here: the export environment uses the rest of this module without the daemon's packages.
    from lineside.agent.config import QueueConfig
    from lineside.agent.pipeline import Pipeline
    from lineside.agent.sources import ReplaySourceConfig
    from lineside.agent.sources.replay import ReplaySource

    config = ReplaySourceConfig(kind="replay", path=replay_dir, rate_hz=0.0, loop=True, max_frames=frames)
    recorder = RecordingSink()
    pipeline = Pipeline(ReplaySource(config), engine, [recorder], QueueConfig())
    start = time.perf_counter()
    pipeline.start()
    try:
        if not pipeline.wait(timeout=3600):
            raise RuntimeError("pipeline did not finish")
        # Up to the last result in the sink: noticing that a finite source has ended (dispatch polls
        # every 0.1 s) is not a per-frame cost, and was 5 % of a 10-frame round.
        seconds = recorder.last_at - start
    finally:
        pipeline.stop()
    if len(recorder.totals) != frames or recorder.errors:
        raise RuntimeError(f"pipeline produced {len(recorder.totals)} results ({recorder.errors} errors) for {frames}")
    return {"seconds": seconds, "fps": frames / seconds, "totals": recorder.totals, "inference": recorder.inference}


def interleaved(engine: InferenceEngine, bare: BareBaseline, replay_dir: Path, frames: int, rounds: int) -> dict:
    """Alternating rounds of bare session.run and the agent pipeline, `frames` each; per-round fps and ratio.

    Short rounds in alternating order (bare-agent, agent-bare, ...) let both sides see the same load.
    """
    rows = []
    totals: list[float] = []
    inference: list[float] = []
    for r in range(rounds):
        order: list[tuple[str, Callable[[], Any]]] = [
            ("bare", lambda: bare.run(frames)),
            ("agent", lambda: pipeline_round(engine, replay_dir, frames)),
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
                inference += result["inference"]
        row["ratio"] = row["agent_fps"] / row["bare_fps"]
        row["load_1min"] = os.getloadavg()[0]
        rows.append(row)
    return {
        "frames_per_round": frames,
        "rounds": rows,
        "bare_fps_median": statistics.median(r["bare_fps"] for r in rows),
        "agent_fps_median": statistics.median(r["agent_fps"] for r in rows),
        "ratio_median": statistics.median(r["ratio"] for r in rows),
        "ratio_min": min(r["ratio"] for r in rows),
        "ratio_max": max(r["ratio"] for r in rows),
        "end_to_end_ms": summarise(totals),
        "predict_in_pipeline_ms": summarise(inference),
    }


def thread_sweep(
    bundle: Path,
    providers: list[str],
    settings: SessionSettings,
    thread_counts: list[int],
    images: list[np.ndarray],
    frames: int,
) -> dict[str, dict[str, float]]:
    """`predict` total ms per intra-op thread count; every frame runs on each engine in turn, order rotating."""
    engines = {
        n: InferenceEngine.load(
            bundle, providers=providers, session=replace(settings, intra_op_threads=n), verify_golden=False
        )
        for n in thread_counts
    }
    samples: dict[int, list[float]] = {n: [] for n in thread_counts}
    try:
        for i in range(frames):
            shift = i % len(thread_counts)
            for n in thread_counts[shift:] + thread_counts[:shift]:
                t0 = time.perf_counter()
                engines[n].predict(images[i % len(images)])
                samples[n].append((time.perf_counter() - t0) * 1000)
    finally:
        for engine in engines.values():
            engine.close()
    return {str(n): summarise(v) for n, v in samples.items()}


# -- the command -----------------------------------------------------------------------------------


@dataclass
class BenchOptions:
    """What `lineside-agent bench` measures."""

    bundle: Path
    images: Path | None = None
    frames: int = 100
    warmup: int = 5
    rounds: int = 6
    providers: list[str] = field(default_factory=lambda: ["cpu"])
    settings: SessionSettings = field(default_factory=SessionSettings)
    skip_unneeded_models: bool = True
    thread_counts: list[int] = field(default_factory=list)
    log: Callable[[str], None] = print


def load_frames(opts: BenchOptions, engine: InferenceEngine) -> tuple[list[np.ndarray], list[bytes], str]:
    """The frames (decoded), their encoded bytes, and where they came from."""
    if opts.images is not None:
        paths = find_images(opts.images)
        if not paths:
            raise ValueError(f"no *.png/*.tif images under {opts.images}")
        blobs = [p.read_bytes() for p in paths]
        return [decode_image(b, str(p)) for b, p in zip(blobs, paths, strict=True)], blobs, str(opts.images)
    images = golden_frames(engine)
    blobs = []
    for image in images:
        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise ValueError("cannot encode a synthetic frame as PNG")
        blobs.append(encoded.tobytes())
    return images, blobs, "the bundle's golden images tiled to 768x572"


def run_bench(opts: BenchOptions) -> dict[str, Any]:
    """Measure; returns the report (see the module docstring). `opts.log` gets progress lines."""
    machine = machine_info()
    rss_before = rss_mb()
    engine = InferenceEngine.load(
        opts.bundle,
        providers=opts.providers,
        session=opts.settings,
        skip_unneeded_models=opts.skip_unneeded_models,
    )
    try:
        images, blobs, origin = load_frames(opts, engine)
        opts.log(f"{len(images)} frames from {origin}; warm-up {opts.warmup} frames")
        for i in range(opts.warmup):
            engine.predict(images[i % len(images)])
        opts.log(f"predict() stages over {opts.frames} frames ...")
        stages = stage_latency(engine, images, blobs, opts.frames)
        # RSS with the engine loaded and warm, before the bench's own extra sessions and batches.
        engine_rss = rss_mb()
        gpu_after_load = gpu_info()
        bare = BareBaseline(engine, resolve_providers(opts.providers).entries, images, opts.settings)
        with tempfile.TemporaryDirectory(prefix="lineside-bench-") as tmp:
            replay_dir = Path(tmp)
            if opts.images is None:
                for i, blob in enumerate(blobs):
                    (replay_dir / f"{i:05d}.png").write_bytes(blob)
            else:  # the replay source reads one flat folder: link the images into one
                for i, p in enumerate(find_images(opts.images)):
                    (replay_dir / f"{i:05d}{p.suffix.lower()}").symlink_to(p.resolve())
            pipeline_round(engine, replay_dir, max(opts.warmup, 2))  # warm-up: threads, replay decode
            per_round = max(1, opts.frames // opts.rounds)
            opts.log(f"throughput: {opts.rounds} alternating rounds of {per_round} frames, bare and pipeline ...")
            throughput = interleaved(engine, bare, replay_dir, per_round, opts.rounds)
        sweep = {}
        if opts.thread_counts:
            opts.log(f"intra-op threads {opts.thread_counts}: {opts.frames} frames each, interleaved ...")
            sweep = thread_sweep(opts.bundle, opts.providers, opts.settings, opts.thread_counts, images, opts.frames)
        machine["load_average_end"] = list(os.getloadavg())
        stage_ms = stages["stages_ms"]
        return {
            "pipeline_fps": throughput["agent_fps_median"],
            "bare_ort_fps": throughput["bare_fps_median"],
            "ratio_vs_bare_ort": throughput["ratio_median"],
            "bare_models_per_frame": bare.models_per_frame,
            "frame_ms": stage_ms["total"],
            "rss_mb": engine_rss,
            "rss_before_engine_mb": rss_before,
            "peak_rss_mb": peak_rss_mb(),
            "gpu": gpu_after_load,
            "providers": engine.providers_in_use,
            "session": {**opts.settings.describe(), "skip_unneeded_models": opts.skip_unneeded_models},
            "machine": machine,
            "bundle": {
                "bundle_id": engine.manifest.bundle_id,
                "version": engine.manifest.version,
                "decision": engine.manifest.decision.model_dump(),
                "tiles": bare.tiles,
                "input_sizes": {k: list(s.preprocessing.input_size) for k, s in engine.manifest.models.items()},
            },
            "images": {
                "source": origin,
                "count": len(images),
                "sizes": sorted({f"{im.shape[1]}x{im.shape[0]} {im.dtype}" for im in images}),
            },
            "frames": opts.frames,
            "warmup": opts.warmup,
            "rounds": opts.rounds,
            "stages_ms": stage_ms,
            "models_run": stages["models_run"],
            "defective_frames": stages["defective_frames"],
            "throughput": throughput,
            "threads_ms": sweep,
        }
    finally:
        engine.close()


def format_report(report: dict[str, Any]) -> str:
    """A readable summary of `report`."""
    m, b = report["machine"], report["bundle"]
    lines = ["== machine"]
    lines.append(
        f"cpu            {m['cpu']} ({m['logical_cores']} logical, {m['usable_cores']} usable), {m['ram_gib']} GiB"
    )
    gpu = report["gpu"] or m["gpu"]
    if gpu:
        for d in gpu["devices"]:
            lines.append(
                f"gpu            {d['index']}: {d['name']}, {d['used_mb']:.0f} / {d['total_mb']:.0f} MiB in use "
                f"(driver {gpu['driver']})"
            )
    else:
        lines.append("gpu            none (no NVIDIA driver)")
    lines.append(f"os / python    {m['os']} / {m['python']}")
    lines.append(f"libraries      numpy {m['numpy']}, opencv {m['opencv']}, onnxruntime {m['onnxruntime']}")
    lines.append(f"providers      in use {', '.join(report['providers'])}")
    lines.append(f"session        {report['session']}")
    la0, la1 = m["load_average_start"], m["load_average_end"]
    lines.append(f"load average   start {la0[0]:.2f}, end {la1[0]:.2f}")
    lines.append("== bundle and frames")
    lines.append(f"bundle         {b['bundle_id']} version {b['version']}; decision {b['decision']}")
    tiles = ", ".join(f"{k} {n} x {b['input_sizes'][k]}" for k, n in b["tiles"].items())
    images = report["images"]
    lines.append(f"frames         {images['count']} ({', '.join(images['sizes'])}) from {images['source']}")
    lines.append(f"tiles/frame    {tiles}")
    runs = ", ".join(f"{k} {n}" for k, n in report["models_run"].items())
    lines.append(f"defective      {report['defective_frames']} of {report['frames']} frames; models ran on: {runs}")
    lines.append("== predict() stages, ms (decode measured apart)")
    lines.append(f"{'stage':<16}{'median':>10}{'p99':>10}{'mean':>10}{'frames':>8}")
    for stage, s in report["stages_ms"].items():
        lines.append(f"{stage:<16}{s['median']:>10.2f}{s['p99']:>10.2f}{s['mean']:>10.2f}{s['n']:>8}")
    t = report["throughput"]
    lines.append(f"== throughput ({len(t['rounds'])} alternating rounds of {t['frames_per_round']} frames)")
    lines.append(
        f"bare session.run  {report['bare_ort_fps']:.2f} frames/s (median of rounds; the models the engine ran "
        f"on each frame, {report['bare_models_per_frame']:.2f} a frame)"
    )
    lines.append(f"agent pipeline    {report['pipeline_fps']:.2f} frames/s (median of rounds)")
    spread = f"min {t['ratio_min']:.3f}, max {t['ratio_max']:.3f}"
    lines.append(f"ratio agent/bare  {report['ratio_vs_bare_ort']:.3f} median ({spread})")
    e = t["end_to_end_ms"]
    lines.append(
        f"agent end-to-end  median {e['median']:.1f} ms, p99 {e['p99']:.1f} ms (capture to result, queue included)"
    )
    lines.append(
        f"memory            RSS {report['rss_mb']:.0f} MiB with the engine loaded (peak {report['peak_rss_mb']:.0f} "
        "MiB incl. the bench's bare sessions)"
    )
    if report["threads_ms"]:
        lines.append("== predict() total by intra-op threads, ms (interleaved)")
        for n, s in report["threads_ms"].items():
            lines.append(f"threads {n:<8}median {s['median']:>8.2f}  p99 {s['p99']:>8.2f}")
    return "\n".join(lines)
