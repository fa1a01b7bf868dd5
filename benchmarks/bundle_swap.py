"""The pause a bundle swap puts into the result stream, against the normal gap between two results.

An agent (replay source looping at full speed -> real engine -> a recording sink) runs while this script
does what the updates service does, `--swaps` times: load and golden-check the other bundle beside the
running one, then `Agent.swap_engine`. For every swap it takes the gap between the last result of the old
bundle and the first of the new one (`inspected_at`, stamped by the inference thread), and compares it with
the gaps between results far from any swap (steady state) and with those while the next bundle loads
(the load competes for the same cores).

Run: `python benchmarks/bundle_swap.py --bundle BUNDLE [--images DIR] [--swaps 30] [--json OUT]`.
Without --images the bundle's golden images are replayed. The second bundle is a copy of the first with
another id and version (the swap does not depend on what the models are).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_latency import machine_info  # a sibling script, not a package

from lineside.agent.config import parse_config
from lineside.agent.results import Frame, InspectionResult
from lineside.agent.runtime import Agent, engine_for
from lineside.agent.sinks.base import Sink


class Recorder(Sink):
    """Keeps (inspected_at in s, bundle version) of every result, in order."""

    name = "swap-recorder"
    durable = False

    def __init__(self) -> None:
        self.marks: list[tuple[float, str | None]] = []
        self.lock = threading.Lock()

    def publish(self, result: InspectionResult, frame: Frame) -> None:
        with self.lock:
            self.marks.append((result.inspected_at.timestamp(), result.bundle_version))

    def close(self) -> None:
        pass

    def count(self) -> int:
        with self.lock:
            return len(self.marks)


def second_bundle(bundle: Path, into: Path) -> Path:
    target = into / "bundle-b"
    shutil.copytree(bundle, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["bundle_id"] = f"{manifest['bundle_id']}-b"
    manifest["version"] = f"{manifest['version']}-b"
    (target / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def ms(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64) * 1000
    return {
        "median": float(np.median(a)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "count": int(a.size),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--images", type=Path, help="frames to replay; default: the bundle's golden images")
    parser.add_argument("--swaps", type=int, default=30)
    parser.add_argument("--between", type=int, default=8, help="results on each bundle before the next load")
    parser.add_argument("--providers", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    info = machine_info()
    print(json.dumps(info, indent=2))
    with tempfile.TemporaryDirectory(prefix="bundle-swap-") as tmp:
        bundles = [args.bundle, second_bundle(args.bundle, Path(tmp))]
        config = parse_config(
            {
                "station": "bench",
                "bundle": {"path": str(bundles[0])},
                "inference": {"providers": args.providers.split(",")},
                "source": {"kind": "replay", "path": str(args.images or args.bundle / "golden"), "loop": True},
                "status_log": {"interval_s": 0},
            }
        )
        recorder = Recorder()
        agent = Agent(config, sinks=[recorder], services=[])
        agent.start()
        windows: list[tuple[float, float]] = []  # (load start, swap returned): not steady state
        swap_calls: list[float] = []
        try:
            for i in range(args.swaps):
                target = recorder.count() + args.between
                while recorder.count() < target:
                    time.sleep(0.005)
                started = time.time()
                engine = engine_for(bundles[(i + 1) % 2], config.inference, verify_golden=True)  # the updater's proof
                swap_calls.append(time.time())
                agent.swap_engine(engine)
                windows.append((started, time.time()))
            target = recorder.count() + args.between
            while recorder.count() < target:
                time.sleep(0.005)
        finally:
            agent.stop()

    marks = recorder.marks
    swap_gaps, steady, loading = [], [], []
    for (t0, v0), (t1, v1) in itertools.pairwise(marks):
        gap = t1 - t0
        if v0 != v1:
            swap_gaps.append(gap)
        elif any(start <= t1 and t0 <= end for start, end in windows):
            loading.append(gap)
        else:
            steady.append(gap)
    report: dict[str, Any] = {
        "machine": info,
        "load_average_end": list(os.getloadavg()),
        "swaps": len(swap_gaps),
        "results": len(marks),
        "swap_gap_ms": ms(swap_gaps),
        "steady_gap_ms": ms(steady),
        "gap_while_loading_ms": ms(loading),
        "extra_pause_ms_median": (statistics.median(swap_gaps) - statistics.median(steady)) * 1000,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, indent=2))
    if len(swap_gaps) != args.swaps:
        print(f"expected {args.swaps} version changes in the results, found {len(swap_gaps)}", file=sys.stderr)
        return 1
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
