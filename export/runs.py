"""The run folder every trainer writes: `model.params` and `train.json`, whose schema is `RunRecord`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lineside.agent.bundle.schema import Preprocessing, TrainingSummary
from lineside.export.data.splits import Split

TRAIN_FILE = "train.json"
PARAMS_FILE = "model.params"


class EpochRecord(BaseModel):
    epoch: int
    train_loss: float
    val_loss: float


class RunDataset(BaseModel):
    root: str
    train_groups: list[str]
    val_groups: list[str]


class RunRecord(BaseModel):
    """`train.json` of a run folder: what was trained, on what, how, and how it went."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="Model kind, a key of export.models.EXPORT_KINDS.")
    architecture: dict[str, Any] = Field(description="What `load` needs to rebuild the network.")
    preprocessing: Preprocessing
    training: TrainingSummary
    history: list[EpochRecord] = Field(default_factory=list)
    dataset: RunDataset
    split: Split | None = None
