"""Amazon Lookout for Vision / SageMaker Ground Truth manifest lines (JSON Lines).

The agent writes this format when it uploads flagged images for review; the export stage reads it
as a training and evaluation source. One line per image:

    {"source-ref": "s3://bucket/key.png", "anomaly-label": 1,
     "anomaly-label-metadata": {"confidence": 1, "job-name": "labeling-job/anomaly-label",
        "class-name": "anomaly", "human-annotated": "yes", "creation-date": "2026-01-31T12:00:00.000",
        "type": "groundtruth/image-classification"},
     "bounding-box": {"image_size": [{"width": 768, "height": 572, "depth": 1}],
        "annotations": [{"class_id": 0, "left": 10, "top": 20, "width": 30, "height": 25}]},
     "bounding-box-metadata": {"class-map": {"0": "defect"}, "type": "groundtruth/object-detection",
        "human-annotated": "yes", "creation-date": "...", "job-name": "labeling-job/defect-boxes"},
     "lineside-part-id": "P-0042"}

`class-name` is what decides normal versus anomaly: in Ground Truth output, `anomaly-label` is only the
index of the class in the labeling job's label list, which depends on the order the labels were
declared (the Lookout for Vision guide itself shows `"anomaly-label": 1` with class-name "normal").
We write 1 for anomaly and 0 for normal. Unknown keys (other label attributes) are ignored on read.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lineside.agent.errors import DatasetError

CLASSIFICATION_TYPE = "groundtruth/image-classification"
DETECTION_TYPE = "groundtruth/object-detection"
DEFAULT_CLASSIFICATION_JOB = "labeling-job/anomaly-label"
DEFAULT_DETECTION_JOB = "labeling-job/defect-boxes"


class _Format(BaseModel):
    # Foreign format: tolerate keys we do not use, accept both field names and the hyphenated keys.
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class ClassificationMetadata(_Format):
    """`anomaly-label-metadata`: who labelled the image, when, and as which class."""

    confidence: float = Field(default=1.0, ge=0, le=1, description="Labeller's confidence, 0-1.")
    job_name: str = Field(default=DEFAULT_CLASSIFICATION_JOB, alias="job-name", description="Labeling job.")
    class_name: Literal["normal", "anomaly"] = Field(alias="class-name", description="The image's class.")
    human_annotated: Literal["yes", "no"] = Field(
        default="yes", alias="human-annotated", description="'no' for machine-made labels (e.g. flags)."
    )
    creation_date: str = Field(alias="creation-date", description="ISO 8601 time the label was made.")
    type: Literal["groundtruth/image-classification"] = Field(default=CLASSIFICATION_TYPE)


class ImageSize(_Format):
    """Size of the labelled image, as Ground Truth records it."""

    width: int = Field(gt=0, description="Pixels.")
    height: int = Field(gt=0, description="Pixels.")
    depth: int = Field(default=1, ge=1, description="Channels: 1 for grey X-ray images.")


class BoxAnnotation(_Format):
    """One box in Ground Truth's form: top-left corner plus size, pixels."""

    class_id: int = Field(default=0, ge=0, description="Key into the metadata's class-map.")
    left: float = Field(description="x of the left edge.")
    top: float = Field(description="y of the top edge.")
    width: float = Field(gt=0, description="Box width.")
    height: float = Field(gt=0, description="Box height.")


class BoundingBoxes(_Format):
    """`bounding-box`: the image size and the defect boxes."""

    image_size: list[ImageSize] = Field(min_length=1, max_length=1, description="Exactly one entry.")
    annotations: list[BoxAnnotation] = Field(default_factory=list, description="Defect boxes.")


class BoundingBoxMetadata(_Format):
    """`bounding-box-metadata`: class names of the box class ids, provenance."""

    class_map: dict[str, str] = Field(default_factory=lambda: {"0": "defect"}, alias="class-map")
    type: Literal["groundtruth/object-detection"] = Field(default=DETECTION_TYPE)
    human_annotated: Literal["yes", "no"] = Field(default="yes", alias="human-annotated")
    creation_date: str = Field(alias="creation-date", description="ISO 8601 time the boxes were made.")
    job_name: str = Field(default=DEFAULT_DETECTION_JOB, alias="job-name")
    objects: list[dict[str, Any]] | None = Field(default=None, description="Per-box confidences, if any.")


class ManifestLine(_Format):
    """One image of a manifest."""

    source_ref: str = Field(alias="source-ref", min_length=1, description="s3:// URI or path of the image.")
    anomaly_label: int | None = Field(
        default=None, alias="anomaly-label", ge=0, description="Class index in the labeling job."
    )
    anomaly_label_metadata: ClassificationMetadata | None = Field(default=None, alias="anomaly-label-metadata")
    bounding_box: BoundingBoxes | None = Field(default=None, alias="bounding-box")
    bounding_box_metadata: BoundingBoxMetadata | None = Field(default=None, alias="bounding-box-metadata")
    part_id: str | None = Field(default=None, alias="lineside-part-id", description="Part / series id.")
    result_id: str | None = Field(
        default=None, alias="lineside-result-id", description="The agent's result id (flagged uploads)."
    )
    flag_reason: Literal["defective", "uncertain", "sampled"] | None = Field(
        default=None, alias="lineside-flag", description="Why the agent uploaded the image (flagged uploads)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> ManifestLine:
        if (self.anomaly_label is None) != (self.anomaly_label_metadata is None):
            raise ValueError("'anomaly-label' and 'anomaly-label-metadata' must come together")
        if self.bounding_box is not None and self.bounding_box.annotations and self.is_anomaly is False:
            raise ValueError("an image labelled 'normal' cannot carry defect boxes")
        return self

    @property
    def is_anomaly(self) -> bool | None:
        """True anomaly, False normal, None when the line has no classification."""
        if self.anomaly_label_metadata is None:
            return None
        return self.anomaly_label_metadata.class_name == "anomaly"

    @property
    def human_verified(self) -> bool:
        """Whether a person labelled the image (machine flags are not ground truth)."""
        meta = self.anomaly_label_metadata
        return meta is not None and meta.human_annotated == "yes"


def now_iso() -> str:
    """Creation date in the form Ground Truth writes (UTC, milliseconds, no zone suffix)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]


def build_line(
    source_ref: str,
    *,
    anomaly: bool,
    boxes: list[tuple[float, float, float, float]] | None = None,
    image_size: tuple[int, int] | None = None,
    part_id: str | None = None,
    human_annotated: bool = True,
    confidence: float = 1.0,
    creation_date: str | None = None,
    job_name: str = DEFAULT_CLASSIFICATION_JOB,
    box_job_name: str = DEFAULT_DETECTION_JOB,
    box_confidences: list[float] | None = None,
    result_id: str | None = None,
    flag_reason: Literal["defective", "uncertain", "sampled"] | None = None,
) -> ManifestLine:
    """A manifest line for one image; `boxes` are (x1, y1, x2, y2) pixels, `image_size` (width, height).

    `box_confidences` (one per box) go into the box metadata's `objects`, as Ground Truth writes them,
    so a labeller adjusting machine boxes sees how sure the model was of each."""
    created = creation_date or now_iso()
    annotated: Literal["yes", "no"] = "yes" if human_annotated else "no"
    metadata = ClassificationMetadata(
        confidence=confidence,
        job_name=job_name,
        class_name="anomaly" if anomaly else "normal",
        human_annotated=annotated,
        creation_date=created,
    )
    bounding_box = bounding_box_metadata = None
    if boxes is not None:
        if image_size is None:
            raise ValueError("image_size (width, height) is needed to write boxes")
        bounding_box = BoundingBoxes(
            image_size=[ImageSize(width=image_size[0], height=image_size[1])],
            annotations=[BoxAnnotation(left=x1, top=y1, width=x2 - x1, height=y2 - y1) for x1, y1, x2, y2 in boxes],
        )
        if box_confidences is not None and len(box_confidences) != len(boxes):
            raise ValueError(f"{len(box_confidences)} box confidences for {len(boxes)} boxes")
        bounding_box_metadata = BoundingBoxMetadata(
            human_annotated=annotated,
            creation_date=created,
            job_name=box_job_name,
            objects=None if box_confidences is None else [{"confidence": c} for c in box_confidences],
        )
    return ManifestLine(
        source_ref=source_ref,
        anomaly_label=1 if anomaly else 0,
        anomaly_label_metadata=metadata,
        bounding_box=bounding_box,
        bounding_box_metadata=bounding_box_metadata,
        part_id=part_id,
        result_id=result_id,
        flag_reason=flag_reason,
    )


def to_line(line: ManifestLine) -> str:
    """One JSON line (no newline), hyphenated keys, absent parts left out."""
    return json.dumps(line.model_dump(mode="json", by_alias=True, exclude_none=True), separators=(",", ":"))


def parse_line(text: str, where: str = "<manifest line>") -> ManifestLine:
    """Parse one JSON line; raises DatasetError naming `where` (e.g. 'file.manifest:12') and the problem."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{where}: not valid JSON ({err.msg} at column {err.colno}): {text[:120]!r}") from err
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: expected a JSON object, found {type(data).__name__}")
    try:
        return ManifestLine.model_validate(data)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<line>'}: {e['msg']}" for e in err.errors())
        raise DatasetError(f"{where}: not a valid manifest line ({problems})") from err
