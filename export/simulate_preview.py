"""A picture a person can judge: simulated defects beside real ones, as a PNG grid of crops.

The PNG holds dataset pixels: write it outside the repository (GDXray may not be redistributed).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lineside.agent.bundle.manifest import Preprocessing
from lineside.agent.inference.preprocess import windowed
from lineside.export.data.base import Dataset
from lineside.export.simulate import (
    KINDS,
    NoPartError,
    SimConfig,
    analyse,
    edge_pixels,
    pick_site,
    random_defect,
    render,
)

logger = logging.getLogger(__name__)
_PROBE = Preprocessing(mode="tile", input_size=(256, 256), channels=1, mean=0.5, std=0.25)


def _crop(unit: np.ndarray, box: tuple[float, float, float, float], crop: int, zoom: int, colour) -> np.ndarray:
    """A crop x crop window centred on the box, zoomed, grey with the box drawn in `colour`."""
    h, w = unit.shape
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = int(np.clip(round(cx - crop / 2), 0, max(0, w - crop)))
    y0 = int(np.clip(round(cy - crop / 2), 0, max(0, h - crop)))
    tile = np.zeros((crop, crop), np.float32)
    part = unit[y0 : y0 + crop, x0 : x0 + crop]
    tile[: part.shape[0], : part.shape[1]] = part
    big = cv2.resize((np.clip(tile, 0, 1) * 255).astype(np.uint8), (crop * zoom, crop * zoom), cv2.INTER_NEAREST)
    rgb = cv2.cvtColor(big, cv2.COLOR_GRAY2BGR)
    p1 = (int((box[0] - x0) * zoom) - 2, int((box[1] - y0) * zoom) - 2)
    p2 = (int((box[2] - x0) * zoom) + 1, int((box[3] - y0) * zoom) + 1)
    cv2.rectangle(rgb, p1, p2, colour, 1)
    return rgb


def _label(rgb: np.ndarray, text: str) -> np.ndarray:
    cv2.putText(rgb, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 255, 255), 1, cv2.LINE_AA)
    return rgb


@dataclass(frozen=True)
class PreviewSheet:
    path: Path
    labels: list[str]  # each cell's label, in grid order: the simulated defects, then the real ones


def render_preview(
    train: Dataset,
    out: Path,
    *,
    count: int = 24,
    seed: int = 0,
    crop: int = 64,
    zoom: int = 3,
    columns: int = 8,
    config: SimConfig | None = None,
) -> PreviewSheet:
    """Write a grid: `count` simulated defects (top, green boxes), then `count` real ones (bottom, red).

    Simulated defects go on verified defect-free images of `train`; real ones are its annotated boxes.
    """
    rng = np.random.default_rng(seed)
    config = config or SimConfig()
    normals = [s for s in train.samples if s.annotated and s.label is False]
    defective = [s for s in train.samples if s.annotated and s.label]
    cells: list[np.ndarray] = []
    labels: list[str] = []
    tries = 0
    while len(cells) < count and tries < count * 10:
        tries += 1
        sample = normals[int(rng.integers(len(normals)))]
        try:
            bg = analyse(windowed(sample.load(), _PROBE), config)
        except NoPartError as err:
            logger.info("preview skips %s: %s", sample.name, err)
            continue
        kind = KINDS[len(cells) % len(KINDS)]
        defect = random_defect(rng, config, kind)
        cx, cy, part, on_edge = pick_site(bg, rng, config, np.nonzero(bg.mask), edge_pixels(bg, None))
        image, box = render(
            bg, defect, cx, cy, rng, blur_sigma=float(rng.uniform(*config.blur_sigma)), min_inside=0.98, part=part
        )
        if box is None:
            continue
        text = f"sim {kind}{' edge' if on_edge else ''} {box[2] - box[0]:.0f}x{box[3] - box[1]:.0f}"
        labels.append(text)
        cells.append(_label(_crop(image, box, crop, zoom, (0, 200, 0)), text))
    for k in range(count):
        sample = defective[int(rng.integers(len(defective)))]
        box = sample.boxes[int(rng.integers(len(sample.boxes)))]
        unit = windowed(sample.load(), _PROBE)
        text = f"real {sample.group} {box.width:.0f}x{box.height:.0f}"
        labels.append(text)
        cells.append(_label(_crop(unit, (box.x1, box.y1, box.x2, box.y2), crop, zoom, (0, 0, 220)), text))
        del k
    side = crop * zoom
    rows = []
    for r in range(0, len(cells), columns):
        row = cells[r : r + columns]
        row += [np.zeros((side, side, 3), np.uint8)] * (columns - len(row))
        rows.append(np.hstack([np.pad(c, ((2, 2), (2, 2), (0, 0))) for c in row]))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), np.vstack(rows)):
        raise OSError(f"{out}: could not write the preview PNG")
    return PreviewSheet(out, labels)
