"""The model bundle manifest: the one contract between the export stage and the agent.

The export stage writes it (`export.bundle_build`), the agent reads it (`agent.bundle.loader`).
Everything the device needs to reproduce the exported behaviour is recorded here: files with sha256,
tensor names/shapes, preprocessing, post-processing parameters, calibrated thresholds, the decision
rule, and golden images with their expected outputs.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lineside.agent.errors import BundleError

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
ModelKind = Literal["classifier", "vae", "ssd"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRef(_Strict):
    """A file inside the bundle, with its checksum."""

    path: str = Field(description="Path relative to the bundle root, '/'-separated.")
    sha256: str = Field(description="Hex sha256 of the file's bytes.", pattern=r"^[0-9a-f]{64}$")


class TensorSpec(_Strict):
    """One graph input or output. A dimension of -1 is dynamic (the batch axis)."""

    name: str = Field(description="Tensor name in the ONNX graph.")
    shape: list[int] = Field(description="Shape, -1 for a dynamic axis.")
    dtype: str = Field(default="float32", description="Element type, numpy spelling.")


class Preprocessing(_Strict):
    """How a decoded grey image becomes model input.

    pixel (uint8/uint16) -> / (2**bits - 1) -> window [low, high] to [0, 1] -> resize by `scale`
    -> tiles of `input_size` (mode 'tile', overlapping by `tile_overlap`) or one resized image
    (mode 'resize') -> (x - mean) / std -> replicate to `channels`.
    """

    mode: Literal["tile", "resize"] = Field(description="Native-resolution tiles, or the whole image resized.")
    input_size: tuple[int, int] = Field(description="Model input (height, width) in pixels.")
    scale: float = Field(default=1.0, gt=0, description="Resize factor applied before tiling.")
    tile_overlap: int = Field(default=0, ge=0, description="Overlap between neighbouring tiles, pixels.")
    channels: Literal[1, 3] = Field(description="Grey is replicated when the model takes 3 channels.")
    window: tuple[float, float] = Field(
        default=(0.0, 1.0), description="Intensity window in normalised [0,1] units, mapped to [0,1]."
    )
    mean: float = Field(description="Mean subtracted after windowing.")
    std: float = Field(gt=0, description="Std divided after windowing.")
    pad_value: float = Field(default=0.0, description="Windowed intensity used to pad partial tiles.")
    training_bit_depth: int = Field(default=8, description="Bit depth of the training images.")

    @model_validator(mode="after")
    def _check(self) -> Preprocessing:
        low, high = self.window
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"window must satisfy 0 <= low < high <= 1, got {self.window}")
        if self.mode == "tile" and self.tile_overlap >= min(self.input_size):
            raise ValueError("tile_overlap must be smaller than the tile")
        return self


class ClassifierPost(_Strict):
    kind: Literal["classifier"] = "classifier"
    positive_index: int = Field(default=1, description="Index of the 'defective' class in the output.")
    aggregate: Literal["max"] = Field(default="max", description="How tile scores make the image score.")


class VAEPost(_Strict):
    """The study's localization: residual -> L2 normalisation -> x original -> threshold -> components."""

    kind: Literal["vae"] = "vae"
    blur_sigma: float = Field(default=2.0, ge=0, description="Gaussian smoothing of the anomaly map, px.")
    border: int = Field(default=4, ge=0, description="Tile border (px) ignored when stitching maps.")
    image_score_quantile: float = Field(
        default=0.9995, gt=0, le=1, description="Quantile of the anomaly map used as the image score."
    )


class SSDPost(_Strict):
    """Decoding of the raw SSD heads, done outside the graph (see docs/ARCHITECTURE.md)."""

    kind: Literal["ssd"] = "ssd"
    anchors: FileRef = Field(description="float32 .npy of shape (A, 4), center form (cx, cy, w, h), pixels.")
    box_stds: tuple[float, float, float, float] = Field(default=(0.1, 0.1, 0.2, 0.2))
    nms_iou: float = Field(default=0.45, gt=0, le=1)
    pre_nms_top_k: int = Field(default=400, gt=0)
    max_detections: int = Field(default=100, gt=0)
    score_floor: float = Field(default=0.01, ge=0, lt=1, description="Scores below are never kept.")


class ParityReport(_Strict):
    """MXNet vs ONNX Runtime on real calibration images."""

    images: int
    max_abs_diff: dict[str, float] = Field(description="Per output: max |mxnet - onnxruntime|.")
    tolerance: dict[str, float] = Field(description="Per output: the allowed max abs difference.")
    passed: bool
    detections_compared: int | None = Field(default=None, description="SSD: GluonCV boxes (score >= 0.2) checked.")
    detections_unmatched: int | None = Field(default=None, description="SSD: of those, boxes our decode missed.")
    detection_max_px_diff: float | None = Field(
        default=None, description="SSD: max box corner difference (px), MXNet heads vs ONNX Runtime heads."
    )


class TrainingSummary(_Strict):
    epochs: int
    seconds: float
    device: str = Field(description="Where it trained, e.g. 'cpu x2 cores' or 'gpu(0)'.")
    train_items: int
    val_items: int
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class ModelSpec(_Strict):
    kind: ModelKind
    file: FileRef
    architecture: str = Field(description="Human-readable network name, e.g. 'ssd mobilenet1.0 tile256'.")
    input: TensorSpec
    outputs: list[TensorSpec]
    preprocessing: Preprocessing
    postprocessing: ClassifierPost | VAEPost | SSDPost = Field(discriminator="kind")
    training: TrainingSummary | None = None
    parity: ParityReport

    @model_validator(mode="after")
    def _kinds_agree(self) -> ModelSpec:
        if self.postprocessing.kind != self.kind:
            raise ValueError(f"model kind {self.kind!r} has postprocessing of kind {self.postprocessing.kind!r}")
        return self


class Thresholds(_Strict):
    """Calibrated on held-out series to maximise F1."""

    classifier: float = Field(default=0.5, description="Image score at or above which the classifier fires.")
    vae_pixel: float = Field(default=1.0, description="Anomaly-map value marking a pixel anomalous.")
    vae_min_area: int = Field(default=16, ge=1, description="Smallest connected component kept, px.")
    vae_image: float = Field(default=1.0, description="Image anomaly score at or above which the VAE fires.")
    ssd_score: float = Field(default=0.5, description="Detection score at or above which a box is reported.")
    ssd_image: float = Field(default=0.5, description="Best box score at or above which the SSD fires for the image.")


class DecisionRule(_Strict):
    """An image is defective when any listed model fires; `score` maps every threshold to 0.5.

    Boxes are reported only for defective images, from the listed localisers, each at its own
    box/pixel threshold (calibrated for localisation, separately from the image decision).
    """

    defective_if_any: list[ModelKind] = Field(min_length=1)
    report_boxes_from: list[ModelKind] = Field(default_factory=lambda: ["ssd", "vae"])


class GoldenImage(_Strict):
    """A synthetic image shipped with the bundle and what the exported models must say about it."""

    file: FileRef
    expected_scores: dict[str, float] = Field(description="Per model kind: the image-level score.")
    expected_is_defective: bool
    expected_boxes: int = Field(
        description="Boxes reported at build time (informational: borderline boxes may differ on fp16)."
    )
    score_tolerance: float = 1e-3


class DatasetSummary(_Strict):
    kind: str
    root: str
    train_groups: list[str]
    val_groups: list[str]
    test_groups: list[str] = Field(default_factory=list)
    images: dict[str, int] = Field(description="Image counts per split.")
    defective_images: dict[str, int]


class BundleManifest(_Strict):
    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    bundle_id: str = Field(description="Stable id of this bundle (uuid4).")
    version: str = Field(description="Monotonic version string, e.g. 2026.11.24-1.")
    created_at: datetime
    models: dict[ModelKind, ModelSpec]
    thresholds: Thresholds
    decision: DecisionRule
    calibration: dict[str, Any] = Field(default_factory=dict, description="Validation figures per model.")
    evaluation: dict[str, Any] = Field(default_factory=dict, description="Test figures, if evaluated.")
    dataset: DatasetSummary | None = None
    golden: list[GoldenImage] = Field(default_factory=list)
    exporter: dict[str, str] = Field(default_factory=dict, description="Versions of the tools that built it.")

    @model_validator(mode="after")
    def _rule_uses_present_models(self) -> BundleManifest:
        for kind in (*self.decision.defective_if_any, *self.decision.report_boxes_from):
            if kind not in self.models:
                raise ValueError(f"decision rule names model {kind!r}, which the bundle does not contain")
        for kind, spec in self.models.items():
            if spec.kind != kind:
                raise ValueError(f"models[{kind!r}] holds a model of kind {spec.kind!r}")
        return self

    def files(self) -> list[FileRef]:
        """Every file the bundle must contain, manifest excluded."""
        refs: list[FileRef] = []
        for spec in self.models.values():
            refs.append(spec.file)
            if isinstance(spec.postprocessing, SSDPost):
                refs.append(spec.postprocessing.anchors)
        refs.extend(g.file for g in self.golden)
        return refs

    def dump(self, folder: Path) -> Path:
        path = folder / MANIFEST_NAME
        path.write_text(self.model_dump_json(indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, folder: Path) -> BundleManifest:
        path = folder / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(f"{path}: no manifest.json in bundle folder {folder}")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise BundleError(f"{path}: cannot read the manifest ({err.strerror or err})") from err
        try:
            return cls.model_validate_json(text)
        except ValueError as err:
            raise BundleError(f"{path}: invalid manifest: {err}") from err
