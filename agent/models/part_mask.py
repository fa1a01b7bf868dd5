"""Where the casting is in a radiograph: the pixels between free air and the no-signal black.

Used on the device (the VAE's anomaly map is only read inside the part: its outline and the detector's
field-of-view border otherwise dominate the residuals) and by the export stage's defect simulator
(defects are only drawn inside the part).
"""

from __future__ import annotations

import cv2
import numpy as np

from lineside.agent.errors import DatasetError


class NoPartError(DatasetError):
    """An image has no region that looks like a casting (nothing to simulate on, no map to read)."""


def part_mask(
    unit: np.ndarray,
    *,
    smooth_sigma: float = 2.0,
    erode: int = 6,
    min_share: float = 0.02,
    steep_edges: bool = False,
) -> np.ndarray:
    """Pixels of the casting: darker than free air, brighter than the black outside the field of view.

    Thresholds sit between the darkest and brightest plateaus of the smoothed image; an opening
    drops thin strands (text, wires), an erosion keeps defects off the part's edges. Steep edges
    inside the grey range (the outline of a thick section, a hole) are left out unless `steep_edges`.
    Raises NoPartError when less than `min_share` of the image remains.
    """
    if unit.ndim != 2 or min(unit.shape) < 16:
        raise NoPartError(f"expected a 2-D image of at least 16x16 pixels, got shape {unit.shape}")
    smooth = cv2.GaussianBlur(unit.astype(np.float32), (0, 0), smooth_sigma)
    dark, bright = np.percentile(smooth, [0.5, 99.5])
    span = float(bright - dark)
    if span < 0.05:
        raise NoPartError(f"no part found: the image is nearly flat (grey levels {dark:.3f}-{bright:.3f})")
    mask = (smooth > dark + 0.08 * span) & (smooth < bright - 0.06 * span)
    # Steep edges (part outline, holes) are left out: the multiplicative law on a blurred edge
    # draws seams there, and the detector would learn those instead of defects.
    if not steep_edges:
        gy, gx = np.gradient(smooth)
        mask &= np.hypot(gx, gy) < 0.02 * span
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7))
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel)
    if erode > 0:
        mask = cv2.erode(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * erode + 1, 2 * erode + 1)))
    mask = mask.astype(bool)
    if mask.mean() < min_share:
        raise NoPartError(
            f"no part found: only {mask.mean():.1%} of the image lies between the free-air and the "
            f"no-signal grey levels ({dark:.3f}-{bright:.3f}); expected at least {min_share:.0%}"
        )
    return mask
