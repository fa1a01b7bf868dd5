"""ONNX Runtime session settings for the CPU path: thread count, spinning, graph optimisation.

Chosen from measurements (docs/benchmarks.md, a 2-core box shared with a training job and test runs):
spinning threads (ONNX Runtime's default) made a frame 1.7-2.3x slower, because busy-waiting threads
take CPU from the pipeline and the neighbours; with spinning off, one and two intra-op threads were equal
within the noise (2 vs 1: 1.07x, 0.78x, 1.06x in three runs), so `auto` uses every usable core (idle
threads sleep, so a core the pipeline needs is given back). The cap at 8 is not measured: 35 small tiles
per frame give many threads little work; `lineside-agent bench --threads 4,8,16` measures a bigger box.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import onnxruntime as ort

GraphOptimization = Literal["disable", "basic", "extended", "all"]

# ONNX Runtime is imported only where sessions are made: check-config reads these names without it.
_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
MAX_AUTO_THREADS = 8  # not measured above 2 cores: see the module docstring


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a systemd CPUAffinity= or a container)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_threads(cores: int | None = None) -> int:
    """Intra-op threads for `cores` usable cores: all of them, at most MAX_AUTO_THREADS."""
    cores = usable_cores() if cores is None else cores
    return max(1, min(cores, MAX_AUTO_THREADS))


@dataclass(frozen=True)
class SessionSettings:
    """How each ONNX Runtime session of an engine runs (the agent config's `inference:` fields)."""

    intra_op_threads: int = 0  # 0 = auto_threads()
    allow_spinning: bool = False
    graph_optimization: GraphOptimization = "all"

    @property
    def threads(self) -> int:
        """The intra-op thread count in effect."""
        return self.intra_op_threads or auto_threads()

    def session_options(self) -> ort.SessionOptions:
        """SessionOptions carrying these settings (models run one after another: sequential mode)."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[self.graph_optimization])
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        return options

    def describe(self) -> dict[str, object]:
        """The settings as reported by `bench` and the status snapshot."""
        return {
            "intra_op_threads": self.threads,
            "allow_spinning": self.allow_spinning,
            "graph_optimization": self.graph_optimization,
        }
