"""Building blocks of the bundle manifest that model kinds use too (files, tensors, preprocessing).

Kept apart from `manifest.py` so each model kind (`agent/models/`) can define its own
post-processing and threshold sections from them, and the manifest can be assembled from the kinds.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Frozen, and unknown keys are errors: a manifest says exactly what the device will do."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRef(Strict):
    """A file inside the bundle, with its checksum."""

    path: str = Field(description="Path relative to the bundle root, '/'-separated.")
    sha256: str = Field(description="Hex sha256 of the file's bytes.", pattern=r"^[0-9a-f]{64}$")


class TensorSpec(Strict):
    """One graph input or output. A dimension of -1 is dynamic (the batch axis)."""

    name: str = Field(description="Tensor name in the ONNX graph.")
    shape: list[int] = Field(description="Shape, -1 for a dynamic axis.")
    dtype: str = Field(default="float32", description="Element type, numpy spelling.")


class Preprocessing(Strict):
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


class ParityReport(Strict):
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


class TrainingSummary(Strict):
    epochs: int
    seconds: float
    device: str = Field(description="Where it trained, e.g. 'cpu x2 cores' or 'gpu(0)'.")
    train_items: int
    val_items: int
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    params: dict[str, Any] = Field(default_factory=dict)


class QuantizationReport(Strict):
    """How an INT8 model was made from the exported float32 one (`lineside-export quantize`), and how close it is.

    `parity` of the model entry stays the float32 export's (MXNet vs ONNX Runtime); this records the second step.
    """

    method: str = Field(description="e.g. 'static QDQ: weights int8 per channel, activations uint8'.")
    calibration: Literal["minmax", "percentile", "entropy"]
    phase_convs: int = Field(
        default=0, description="ConvTranspose layers rewritten (exactly) as phase convolutions, which quantise."
    )
    tiles: int = Field(description="Input tiles the activation ranges were calibrated on.")
    frames: int = Field(description="Images those tiles came from.")
    real_frames: int = Field(description="Of those, images given with --images (the rest: the golden images).")
    fp32_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="The float32 model it was made from.")
    tool: str = Field(description="e.g. 'onnxruntime 1.31.1, onnx 1.23.2'.")
    max_abs_diff: dict[str, float] = Field(description="Per output: max |float32 - int8| on the calibration tiles.")
    verdict_flips: int = Field(description="Of `frames`, images the INT8 bundle judges otherwise than the float32 one.")
    max_score_diff: float = Field(description="Max |float32 - int8| of this model's image score on `frames`.")
    golden_flips: int = Field(
        default=0, description="Golden images whose verdict INT8 flipped (only with --allow-golden-flips)."
    )
