"""ONNX Runtime session settings for the CPU path: thread count, spinning, graph optimisation.

Defaults come from `lineside-agent bench` (docs/benchmarks.md): on a 2-core box whose other core is
busy, one intra-op thread ran the three models 1.8x faster than ONNX Runtime's default (one thread per
core, spinning), and the busy-waiting of spinning threads cost more than it saved. The frame pipeline's
own threads (capture/decode, post-processing, dispatch) need a core too, so `auto` leaves one free.
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
# Beyond this, 35 small tiles per frame give each thread too little work (an untested assumption
# above 2 cores: `bench --threads` measures it on the target box).
MAX_AUTO_THREADS = 8


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a systemd CPUAffinity= or a container)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_threads(cores: int | None = None) -> int:
    """Intra-op threads for `cores` usable cores: one core left to the pipeline, at most MAX_AUTO_THREADS."""
    cores = usable_cores() if cores is None else cores
    return max(1, min(cores - 1, MAX_AUTO_THREADS))


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
