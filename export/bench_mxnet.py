"""`lineside-export bench-mxnet`: the bundle's ONNX Runtime sessions against the same trained weights
run hybridized in MXNet, on the same frames' tiles.

Per frame, all three models on that frame's tile batches, once in ONNX Runtime (plain `session.run`,
the agent's session settings) and once in MXNet (the run folder's Gluon network, hybridized with
static allocation), order alternating frame by frame so background load hits both alike. The first
frame's outputs are compared too (max abs difference), proving both sides run the same weights.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import mxnet as mx
import numpy as np

from lineside.agent.bench import BareBaseline, BenchOptions, load_frames, machine_info, summarise
from lineside.agent.errors import ExportError
from lineside.agent.inference.engine import InferenceEngine
from lineside.agent.inference.providers import resolve_providers
from lineside.agent.inference.settings import SessionSettings
from lineside.export.models import EXPORT_KINDS
from lineside.export.train import read_run


def _mxnet_views(engine: InferenceEngine, runs: Path) -> dict[str, mx.gluon.HybridBlock]:
    """The export view of each of the bundle's models, from `runs/<kind>`, hybridized."""
    views = {}
    for kind, spec in engine.manifest.models.items():
        run = runs / kind
        if not (run / "train.json").is_file():
            raise ExportError(f"{run}: no run folder for the bundle's {kind} model (expected {run}/train.json)")
        record = read_run(run, kind)
        if record.preprocessing != spec.preprocessing:
            raise ExportError(f"{run}: its preprocessing differs from the bundle's {kind} model: another run?")
        _net, view, _arch = EXPORT_KINDS[kind].load(run, record)
        view.hybridize(static_alloc=True, static_shape=True)
        views[kind] = view
    return views


def _mxnet_run(view: mx.gluon.HybridBlock, batch: np.ndarray) -> list[np.ndarray]:
    outputs = view(mx.nd.array(batch))
    outputs = [outputs] if isinstance(outputs, mx.nd.NDArray) else list(outputs)
    return [o.asnumpy() for o in outputs]  # asnumpy waits for MXNet's asynchronous engine


def bench_mxnet(
    bundle: Path, runs: Path, images: Path | None = None, frames: int = 20, settings: SessionSettings | None = None
) -> dict[str, Any]:
    """ONNX Runtime vs MXNet ms per frame (all models on one frame's tiles) and their ratio."""
    settings = settings or SessionSettings()
    machine = machine_info()
    engine = InferenceEngine.load(bundle, providers=["cpu"], session=settings, verify_golden=False)
    try:
        opts = BenchOptions(bundle=bundle, images=images, settings=settings)
        frames_list, _, origin = load_frames(opts, engine)
        bare = BareBaseline(engine, resolve_providers(["cpu"]).entries, frames_list, settings)
        kinds = list(engine.manifest.models)
        views = _mxnet_views(engine, runs)
        parity = {}
        for (session, name), kind, batch in zip(bare.sessions, kinds, bare.batches[0], strict=True):
            ours = session.run(None, {name: batch})
            theirs = _mxnet_run(views[kind], batch)  # also the MXNet warm-up for this batch shape
            parity[kind] = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs, strict=True))
        for batches in bare.batches:  # warm every batch shape on the MXNet side
            for kind, batch in zip(kinds, batches, strict=True):
                _mxnet_run(views[kind], batch)
        ort_ms: dict[str, list[float]] = {k: [] for k in (*kinds, "frame")}
        mx_ms: dict[str, list[float]] = {k: [] for k in (*kinds, "frame")}
        for i in range(frames):
            batches = bare.batches[i % len(bare.batches)]
            sides = ("ort", "mxnet") if i % 2 == 0 else ("mxnet", "ort")
            for side in sides:
                target = ort_ms if side == "ort" else mx_ms
                start = time.perf_counter()
                for (session, name), kind, batch in zip(bare.sessions, kinds, batches, strict=True):
                    t0 = time.perf_counter()
                    if side == "ort":
                        session.run(None, {name: batch})
                    else:
                        _mxnet_run(views[kind], batch)
                    target[kind].append((time.perf_counter() - t0) * 1000)
                target["frame"].append((time.perf_counter() - start) * 1000)
        machine["load_average_end"] = list(os.getloadavg())
        pairs = np.asarray(ort_ms["frame"]) / np.asarray(mx_ms["frame"])
        return {
            "ort_vs_mxnet_latency_ratio": float(np.median(ort_ms["frame"]) / np.median(mx_ms["frame"])),
            "ort_vs_mxnet_per_frame_ratio_median": float(np.median(pairs)),
            "ort_ms": {k: summarise(v) for k, v in ort_ms.items()},
            "mxnet_ms": {k: summarise(v) for k, v in mx_ms.items()},
            "per_model_ratio": {k: float(np.median(ort_ms[k]) / np.median(mx_ms[k])) for k in kinds},
            "max_abs_diff_first_frame": parity,
            "tiles": bare.tiles,
            "frames": frames,
            "images": origin,
            "session": settings.describe(),
            "mxnet": {"version": mx.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "default")},
            "machine": machine,
        }
    finally:
        engine.close()


def format_report(report: dict[str, Any]) -> str:
    """A readable summary of `report`."""
    m = report["machine"]
    lines = [
        f"cpu {m['cpu']} ({m['usable_cores']} usable cores); onnxruntime {m['onnxruntime']} {report['session']}; "
        f"mxnet {report['mxnet']['version']} (OMP_NUM_THREADS {report['mxnet']['omp_num_threads']}); load "
        f"{m['load_average_start'][0]:.2f} -> {m['load_average_end'][0]:.2f}",
        f"{report['frames']} frames from {report['images']}; tiles per frame {report['tiles']}",
        f"{'ms':<12}{'ORT median':>12}{'ORT p99':>10}{'MXNet median':>14}{'MXNet p99':>11}{'ratio':>8}",
    ]
    for kind in [*report["per_model_ratio"], "frame"]:
        o, x = report["ort_ms"][kind], report["mxnet_ms"][kind]
        ratio = report["per_model_ratio"].get(kind, report["ort_vs_mxnet_latency_ratio"])
        lines.append(
            f"{kind:<12}{o['median']:>12.1f}{o['p99']:>10.1f}{x['median']:>14.1f}{x['p99']:>11.1f}{ratio:>8.3f}"
        )
    lines.append(
        f"ORT / MXNet latency ratio (medians, all models on one frame): {report['ort_vs_mxnet_latency_ratio']:.3f}; "
        f"outputs agree to {max(report['max_abs_diff_first_frame'].values()):.2g} (max abs diff)"
    )
    return "\n".join(lines)
