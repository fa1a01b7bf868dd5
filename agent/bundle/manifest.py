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

from pydantic import Field, model_validator

from lineside.agent.bundle.schema import (
    FileRef,
    ParityReport,
    Preprocessing,
    QuantizationReport,
    Strict,
    TensorSpec,
    TrainingSummary,
)
from lineside.agent.errors import BundleError
from lineside.agent.models import MODEL_KINDS, ModelKindName, PostUnion, ThresholdsUnion

__all__ = [
    "MANIFEST_NAME",
    "BundleManifest",
    "DatasetSummary",
    "DecisionRule",
    "FileRef",
    "GoldenImage",
    "ModelSpec",
    "ParityReport",
    "Preprocessing",
    "QuantizationReport",
    "TensorSpec",
    "TrainingSummary",
]

MANIFEST_NAME = "manifest.json"
# 2: thresholds moved into each model's entry (`models[kind].thresholds`); kinds are a registry.
MANIFEST_SCHEMA_VERSION = 2


class ModelSpec(Strict):
    """One model of the bundle: its graph, how its input is made, how its outputs are read and judged."""

    kind: ModelKindName
    file: FileRef
    architecture: str = Field(description="Human-readable network name, e.g. 'ssd mobilenet1.0 tile256'.")
    input: TensorSpec
    outputs: list[TensorSpec]
    preprocessing: Preprocessing
    postprocessing: PostUnion
    thresholds: ThresholdsUnion = Field(description="Calibrated on held-out series (see docs/evaluation.md).")
    training: TrainingSummary | None = None
    parity: ParityReport
    quantization: QuantizationReport | None = Field(default=None, description="Set when the graph is INT8.")

    @model_validator(mode="after")
    def _kinds_agree(self) -> ModelSpec:
        for section in ("postprocessing", "thresholds"):
            found = getattr(self, section).kind
            if found != self.kind:
                raise ValueError(f"model kind {self.kind!r} has {section} of kind {found!r}")
        expected = set(MODEL_KINDS[self.kind].output_names)
        recorded = {o.name for o in self.outputs}
        if not expected <= recorded:
            raise ValueError(
                f"model kind {self.kind!r} reads outputs {sorted(expected)}, graph records {sorted(recorded)}"
            )
        return self


class DecisionRule(Strict):
    """An image is defective when any listed model fires; `score` maps every threshold to 0.5.

    Boxes are reported only for defective images, from the listed localisers, each at its own
    box/pixel threshold (calibrated for localisation, separately from the image decision).
    """

    defective_if_any: list[ModelKindName] = Field(min_length=1)
    report_boxes_from: list[ModelKindName] = Field(default_factory=list)

    @model_validator(mode="after")
    def _boxes_from_localisers(self) -> DecisionRule:
        for kind in self.report_boxes_from:
            if not MODEL_KINDS[kind].localiser:
                raise ValueError(f"report_boxes_from names {kind!r}, which produces no boxes")
        return self


class GoldenImage(Strict):
    """A synthetic image shipped with the bundle and what the exported models must say about it."""

    file: FileRef
    expected_scores: dict[str, float] = Field(description="Per model kind: the image-level score.")
    expected_is_defective: bool
    expected_boxes: int = Field(
        description="Boxes reported at build time (informational: borderline boxes may differ on fp16)."
    )
    score_tolerance: float = 1e-3


class DatasetSummary(Strict):
    kind: str
    root: str
    train_groups: list[str]
    val_groups: list[str]
    test_groups: list[str] = Field(default_factory=list)
    images: dict[str, int] = Field(description="Image counts per split.")
    defective_images: dict[str, int]


class BundleManifest(Strict):
    schema_version: Literal[2] = MANIFEST_SCHEMA_VERSION
    bundle_id: str = Field(description="Stable id of this bundle (uuid4).")
    version: str = Field(description="Monotonic version string, e.g. 2026.11.24-1.")
    created_at: datetime
    models: dict[ModelKindName, ModelSpec]
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
            refs.extend(MODEL_KINDS[spec.kind].extra_files(spec.postprocessing))
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
