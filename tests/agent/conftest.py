"""Shared helpers for the agent tests: real image files and a recording stand-in for the engine.

Exposed as fixtures (not imports), so they work under any pytest import mode.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest

from lineside.agent.inference.types import Detection, Prediction


def png_bytes(height: int = 32, width: int = 40, *, value: int = 100, dtype: type = np.uint8) -> bytes:
    """A real grey PNG (8- or 16-bit) with a bright square, so images differ by `value`."""
    image = np.full((height, width), value, dtype=dtype)
    image[4:12, 4:12] = np.iinfo(dtype).max // 2
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def write_png(path: Path, **kwargs: object) -> Path:
    """Write a PNG the way the hot-folder contract asks: complete under a temporary name, then renamed
    (a source polling with settle_seconds=0 could otherwise read it half-written)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(png_bytes(**kwargs))  # type: ignore[arg-type]
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class FakeManifest:
    bundle_id: str = "test-bundle"
    version: str = "2026.01.01-1"


@dataclass
class RecordingInspector:
    """Stands in for InferenceEngine (no bundle needed); records every call.

    `delay` makes it slow; `fail_every` makes every n-th call raise.
    """

    delay: float = 0.0
    fail_every: int = 0
    providers_in_use: list[str] = field(default_factory=lambda: ["CPUExecutionProvider"])
    manifest: FakeManifest = field(default_factory=FakeManifest)
    calls: list[tuple[tuple[int, ...], str, int | None]] = field(default_factory=list)
    closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def close(self) -> None:
        self.closed = True

    def predict(self, image: np.ndarray, bits_stored: int | None = None) -> Prediction:
        with self._lock:
            self.calls.append((image.shape, str(image.dtype), bits_stored))
            n = len(self.calls)
        if self.delay:
            time.sleep(self.delay)
        if self.fail_every and n % self.fail_every == 0:
            raise RuntimeError(f"simulated engine failure on call {n}")
        score = float(image.mean()) / float(np.iinfo(image.dtype).max)
        box = Detection(x1=4.0, y1=4.0, x2=12.0, y2=12.0, score=0.9, source="ssd")
        return Prediction(
            is_defective=score >= 0.3,
            score=score,
            boxes=(box,),
            model_scores={"ssd": 0.9},
            fired=("ssd",),
            timings_ms={"preprocess": 0.5, "ssd": 1.0},
        )


@pytest.fixture
def make_png() -> Callable[..., bytes]:
    """png_bytes(height, width, value=..., dtype=...)."""
    return png_bytes


@pytest.fixture
def put_png() -> Callable[..., Path]:
    """write_png(path, height=..., width=..., value=..., dtype=...)."""
    return write_png


@pytest.fixture
def make_inspector() -> Callable[..., RecordingInspector]:
    """RecordingInspector(delay=..., fail_every=...)."""
    return RecordingInspector


@pytest.fixture(scope="session")
def classifier_rule_bundle(test_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the test bundle with a fixed rule: defective when the classifier fires, boxes from the VAE
    and the SSD.

    Tests of threshold overrides and of model skipping need a known rule with a model whose image
    threshold may be set anywhere in [0, 1]; the rule calibrated for a bundle trained for seconds on
    synthetic data varies. Golden verdicts follow the original rule: load it with verify_golden=False.
    """
    import json
    import shutil

    copy = tmp_path_factory.mktemp("classifier-rule") / "bundle"
    shutil.copytree(test_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text(encoding="utf-8"))
    manifest["decision"] = {"defective_if_any": ["classifier"], "report_boxes_from": ["vae", "ssd"]}
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return copy
