"""The export side of a model kind: how it trains, what it exports, how it is calibrated and evaluated.

Each kind lives in its own folder (`export/models/<kind>/`: the Gluon network and its `ExportKind`)
and pairs with its device side in `agent/models/<kind>.py` (output names, post-processing, thresholds).
`export/models/__init__.py` registers the kinds; nothing else in the export stage names a kind.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from lineside.agent.inference.types import ModelOutputs
from lineside.agent.models import KindOutput, KindPost, KindThresholds, ModelKind
from lineside.export import metrics
from lineside.export.data.base import Dataset, Sample
from lineside.export.data.splits import Split
from lineside.export.runs import RunRecord

if TYPE_CHECKING:
    import mxnet as mx

    from lineside.export.train import TrainOptions


NO_DETECTIONS = (np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))


def ground_truth(sample: Sample) -> np.ndarray:
    """A sample's defect boxes as an (N, 4) array."""
    return np.asarray([(b.x1, b.y1, b.x2, b.y2) for b in sample.boxes], np.float32).reshape(-1, 4)


def add_simulation_arguments(parser: argparse.ArgumentParser) -> None:
    """--simulate / --copy-paste: positives from defects simulated on the training series' normal images."""
    parser.add_argument(
        "--simulate", type=float, default=0.0, metavar="SHARE",
        help="share of positive tiles with defects simulated on defect-free training images",
    )  # fmt: skip
    parser.add_argument(
        "--copy-paste", type=float, default=0.0, metavar="SHARE",
        help="share of the simulated tiles made by pasting real training defects instead of physics",
    )  # fmt: skip
    parser.add_argument(
        "--sim-px-per-mm", type=parse_px_per_mm, metavar="MIN,MAX",
        help="geometric magnification of simulated defects, pixels per mm, drawn log-uniformly (default 2.5,3.5: "
        "GDXray wheels, 6-60 px boxes; 2.5,10 also draws defects up to ~150 px)",
    )  # fmt: skip
    parser.add_argument(
        "--sim-flat", type=parse_share, default=0.0, metavar="SHARE",
        help="share of simulated pores drawn flat along the beam: large in the image but faint, a few percent of "
        "the grey value (default 0)",
    )  # fmt: skip
    parser.add_argument(
        "--sim-edges", type=parse_share, default=0.0, metavar="SHARE",
        help="share of simulated defects centred on steep edges inside the part (a thick section's outline), "
        "which the part mask otherwise keeps them away from (default 0)",
    )  # fmt: skip


def parse_share(text: str) -> float:
    """A share in [0, 1]; a clear error otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}")
    return value


def parse_px_per_mm(text: str) -> tuple[float, float]:
    """'MIN,MAX' -> (MIN, MAX) pixels per mm, 0.5 <= MIN <= MAX <= 40; a clear error otherwise."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sim-px-per-mm must be MIN,MAX (e.g. 2.5,10), got {text!r}") from None
    if not 0.5 <= low <= high <= 40:
        raise argparse.ArgumentTypeError(f"--sim-px-per-mm needs 0.5 <= MIN <= MAX <= 40, got {low:g},{high:g}")
    return low, high


class ExportKind(ABC):
    """One model kind in the export stage; see the module docstring."""

    name: ClassVar[str]
    device: ClassVar[type[ModelKind]]
    default_epochs: ClassVar[int] = 10
    # Max |MXNet - ONNX Runtime| allowed per graph output on real calibration tiles (docs/evaluation.md).
    tolerances: ClassVar[dict[str, float]]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Kind-specific options of `lineside-export train-<kind>` (presets, --pretrained...)."""
        return None

    @abstractmethod
    def train(self, train: Dataset, val: Dataset, opts: TrainOptions, split: Split | None = None) -> Path:
        """Train in MXNet Gluon; writes a run folder (`model.params` + `train.json`) after every epoch."""

    @abstractmethod
    def load(self, run: Path, record: RunRecord) -> tuple[mx.gluon.HybridBlock, mx.gluon.HybridBlock, str]:
        """(trained network, its export view whose outputs are `device.output_names`, architecture name)."""

    def post(self, net: mx.gluon.HybridBlock, record: RunRecord, bundle_dir: Path) -> KindPost:
        """Post-processing parameters for the manifest; may write extra bundle files into `bundle_dir`."""
        return self.device.post_class()

    def detection_parity(
        self,
        net: mx.gluon.HybridBlock,
        view: mx.gluon.HybridBlock,
        batches: list[np.ndarray],
        onnx_path: Path,
        post: KindPost,
    ) -> dict[str, Any]:
        """Extra parity figures beyond the raw outputs (ParityReport fields); raises ParityError on failure."""
        return {}

    @abstractmethod
    def calibrate(
        self, outputs: Sequence[ModelOutputs], samples: Sequence[Sample]
    ) -> tuple[KindThresholds, dict[str, Any]]:
        """Thresholds chosen on validation series, and the figures they reached there."""

    def candidate_boxes(self, out: KindOutput, thresholds: KindThresholds) -> tuple[np.ndarray, np.ndarray]:
        """Boxes this model proposes for an image, with scores (AP ranks them); default: what the device reports."""
        return self.device.boxes(out, thresholds)

    def box_score_threshold(self, thresholds: KindThresholds) -> float:
        """Score from which candidate boxes count in the box figures (they are all ranked for AP)."""
        return 0.0

    def image_evals(
        self,
        outputs: Sequence[ModelOutputs],
        samples: Sequence[Sample],
        thresholds: KindThresholds,
        gate: bool = True,
    ) -> list[metrics.ImageEval]:
        """Per-image records of this model used alone, with its boxes.

        With `gate`, an image gets boxes only when the model fires for it (as the agent reports them);
        without, every image gets the model's boxes (to calibrate box thresholds on their own).
        """
        out = []
        for o, s in zip(outputs, samples, strict=True):
            mine = o.models[self.name]
            decision = mine.score >= thresholds.image
            boxes, scores = self.candidate_boxes(mine, thresholds) if decision or not gate else NO_DETECTIONS
            out.append(
                metrics.ImageEval(
                    s.name, ground_truth(s), boxes, scores, (o.height, o.width), bool(s.label), decision, mine.score
                )
            )
        return out

    def evaluate(
        self, outputs: Sequence[ModelOutputs], samples: Sequence[Sample], thresholds: KindThresholds
    ) -> dict[str, Any]:
        """Figures of this model used alone on test images (image level; localisers add box figures)."""
        if not self.device.localiser:
            labels = np.asarray([bool(s.label) for s in samples])
            decisions = np.asarray([o.models[self.name].score >= thresholds.image for o in outputs])
            return {"image": metrics.image_level(labels, decisions)}
        evals = self.image_evals(outputs, samples, thresholds)
        return metrics.evaluate_method(evals, score_threshold=self.box_score_threshold(thresholds))
