"""Deterministic synthetic X-ray images of aluminium castings, written in the GDXray layout.

Made for tests, the demo and sanity checks of the training pipeline: the GDXray images may not be
copied or shipped, so everything that must run anywhere runs on these instead.

The physics is simple but consistent: a part is a thickness map in millimetres (a wheel: rim, hub
with bore and bolt holes, spokes with pockets and open windows between them; or a knuckle: an
irregular body with lugs and bores), transmitted intensity is `exp(-mu * thickness)`, so thicker
metal is darker, as in GDXray. Defects change the thickness map before projection: gas pores,
shrinkage clusters and cracks remove metal (brighter spots), inclusions are denser than aluminium
(darker spots). Then come the heel effect and intensifier vignetting (smooth gradients), scatter,
unsharpness (blur), quantum noise (signal dependent) plus read noise, the intensifier's circular
field of view, and quantisation.

Appearance was matched to GDXray series C0001 (wheel) and C0054 (knuckle): bright background
(~0.8 of full scale), metal between ~0.15 and ~0.6, dark corners outside the circular field,
defect contrast a few grey levels (8-bit) above a noise of about one grey level.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from lineside.agent.errors import DatasetError

logger = logging.getLogger(__name__)

PartKind = Literal["wheel", "knuckle"]
DefectKind = Literal["pore", "shrinkage", "crack", "inclusion"]

README_MARKER = "# Synthetic X-ray castings (lineside)"
MU_AL = 0.05  # 1/mm: aluminium at an effective ~100 keV, so 8-40 mm of metal gives 0.4-2.0 attenuation
MU_INCLUSION = 0.16  # 1/mm: iron-rich or oxide inclusion, roughly three times aluminium
MIN_SIZE = 128  # pixels; the largest defect (40 px) must fit well inside the field of view
MIN_BOX, MAX_BOX = 10, 40  # defect box side lengths, pixels
MIN_METAL_MM = 7.0  # defects only where the part is at least this thick
_DEFECT_KINDS: tuple[DefectKind, ...] = ("pore", "shrinkage", "crack", "inclusion")
_DEFECT_WEIGHTS = np.array([0.4, 0.25, 0.15, 0.2])
_SERIES_DIR = re.compile(r"^S\d{4}$")


class SynthSummary(BaseModel):
    """What `generate` wrote."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root: str = Field(description="Output folder; images are under root/Castings/.")
    seed: int = Field(description="Seed of the run; the same seed gives byte-identical files.")
    size: tuple[int, int] = Field(description="Image (height, width) in pixels.")
    bit_depth: Literal[8, 16] = Field(description="Bits per pixel of the PNG files.")
    series: int = Field(description="Number of series folders (one part each).")
    images: int = Field(description="Number of images written.")
    defective_images: int = Field(description="Images with at least one defect box.")
    defect_free_images: int = Field(description="Images without defects.")
    boxes: int = Field(description="Defect boxes written to the ground_truth.txt files.")
    defects_by_kind: dict[str, int] = Field(description="Boxes per defect kind.")
    parts: dict[str, str] = Field(description="Series name -> part kind.")


def generate(
    out: Path,
    images: int,
    seed: int,
    *,
    size: tuple[int, int] = (572, 768),
    bit_depth: int = 8,
    defect_free_share: float = 0.3,
    images_per_series: int = 12,
    part: str = "mixed",
    defect_contrast: float = 1.0,
) -> SynthSummary:
    """Write `images` synthetic radiographs in the GDXray layout under `out`.

    `size` is (height, width). Series Sxxxx hold `images_per_series` views of one part each (the last
    one may hold fewer); `part` is "wheel", "knuckle" or "mixed" (alternating by series). Exactly
    round(defect_free_share * images) images are defect-free, chosen at random over the whole run.
    16-bit output spans the full 0-65535 range (the same signal as 8-bit, finer quantisation), so
    `to_unit_range(image)` without `bits_stored` gives the same scale for both depths.
    Rewriting a folder written by an earlier run is allowed; any other non-empty folder is refused.
    `defect_contrast` scales how much metal a defect removes or adds (1.0: GDXray-like subtlety; the
    demo uses more so that a few minutes of CPU training already find them).
    """
    height, width = _check_args(images, seed, size, bit_depth, defect_free_share, images_per_series, part)
    if not 0 < defect_contrast <= 10:
        raise DatasetError(f"defect_contrast must be in (0, 10], got {defect_contrast}")
    out = Path(out)
    castings = out / "Castings"
    _prepare_output(out, castings)

    n_series = math.ceil(images / images_per_series)
    clean = np.zeros(images, dtype=bool)
    n_clean = round(defect_free_share * images)
    clean[np.random.default_rng([seed, 0, 0]).permutation(images)[:n_clean]] = True

    by_kind = dict.fromkeys(_DEFECT_KINDS, 0)
    parts: dict[str, str] = {}
    defective = 0
    grid = _Grid(height, width)
    for s in range(n_series):
        name = f"S{s + 1:04d}"
        kind: PartKind = _part_kind(part, s)
        parts[name] = kind
        series_rng = np.random.default_rng([seed, s + 1])
        shape = _PartShape.random(kind, series_rng, grid)
        series_dir = castings / name
        series_dir.mkdir(parents=True, exist_ok=True)
        lines: list[str] = []
        for i in range(min(images_per_series, images - s * images_per_series)):
            index = s * images_per_series + i
            pixels, defects = _render(
                shape,
                grid,
                (seed, s + 1, i + 1),
                want_defects=not clean[index],
                bit_depth=bit_depth,
                contrast=defect_contrast,
            )
            _write_atomic(series_dir / f"{name}_{i + 1:04d}.png", _encode_png(pixels))
            defective += bool(defects)
            for kind_name, (x1, y1, x2, y2) in defects:
                by_kind[kind_name] += 1
                lines.append(f"{i + 1:d} {x1:.1f} {x2:.1f} {y1:.1f} {y2:.1f}\n")
        _write_atomic(series_dir / "ground_truth.txt", "".join(lines).encode())
    _write_atomic(out / "README.md", _readme(seed, images, (height, width), bit_depth).encode())
    summary = SynthSummary(
        root=str(out),
        seed=seed,
        size=(height, width),
        bit_depth=bit_depth,  # type: ignore[arg-type]
        series=n_series,
        images=images,
        defective_images=defective,
        defect_free_images=images - defective,
        boxes=sum(by_kind.values()),
        defects_by_kind=by_kind,
        parts=parts,
    )
    logger.info(
        "wrote %d synthetic images (%d defective, %d boxes) in %d series to %s",
        images,
        defective,
        summary.boxes,
        n_series,
        castings,
    )
    return summary


def _check_args(
    images: int,
    seed: int,
    size: tuple[int, int],
    bit_depth: int,
    defect_free_share: float,
    images_per_series: int,
    part: str,
) -> tuple[int, int]:
    if images < 1:
        raise DatasetError(f"images must be at least 1, got {images}")
    if seed < 0:
        raise DatasetError(f"seed must be a non-negative integer, got {seed}")
    if len(size) != 2 or min(size) < MIN_SIZE:
        raise DatasetError(f"size must be (height, width) with both at least {MIN_SIZE} pixels, got {size}")
    if bit_depth not in (8, 16):
        raise DatasetError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if not 0.0 <= defect_free_share <= 1.0:
        raise DatasetError(f"defect_free_share must be within [0, 1], got {defect_free_share}")
    if images_per_series < 1:
        raise DatasetError(f"images_per_series must be at least 1, got {images_per_series}")
    if part not in ("wheel", "knuckle", "mixed"):
        raise DatasetError(f"part must be 'wheel', 'knuckle' or 'mixed', got {part!r}")
    return int(size[0]), int(size[1])


def _prepare_output(out: Path, castings: Path) -> None:
    """Refuse foreign non-empty folders; drop series left over from an earlier, larger run."""
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: expected a folder for the synthetic data set, found a file")
    if out.is_dir() and any(out.iterdir()):
        readme = out / "README.md"
        if not (readme.is_file() and readme.read_text(errors="replace").startswith(README_MARKER)):
            raise DatasetError(f"{out}: folder is not empty and was not written by lineside synth; choose a new folder")
        if castings.is_dir():
            for child in castings.iterdir():
                # Only our own Sxxxx folders are removed; they are rewritten below if still wanted.
                if child.is_dir() and _SERIES_DIR.match(child.name):
                    shutil.rmtree(child)
    castings.mkdir(parents=True, exist_ok=True)


def _part_kind(part: str, series_index: int) -> PartKind:
    if part == "wheel":
        return "wheel"
    if part == "knuckle":
        return "knuckle"
    return "wheel" if series_index % 2 == 0 else "knuckle"


class _Grid:
    """Pixel-centre coordinates, kept as broadcastable row/column vectors to save memory and time.

    The part's thickness is smooth, so it is rendered on the half-resolution `coarse_x/coarse_y`
    (in full-resolution units) and upsampled: four times fewer transcendental function calls.
    """

    def __init__(self, height: int, width: int) -> None:
        self.height = height
        self.width = width
        self.x = (np.arange(width, dtype=np.float32) + 0.5)[None, :]
        self.y = (np.arange(height, dtype=np.float32) + 0.5)[:, None]
        self.coarse_size = ((width + 1) // 2, (height + 1) // 2)
        self.coarse_x = ((np.arange(self.coarse_size[0], dtype=np.float32) + 0.5) * (width / self.coarse_size[0]))[
            None, :
        ]
        self.coarse_y = ((np.arange(self.coarse_size[1], dtype=np.float32) + 0.5) * (height / self.coarse_size[1]))[
            :, None
        ]
        self.scale = float(min(height, width))


class _PartShape:
    """One physical part: kind, its random design parameters and the station set-up of its series."""

    def __init__(self, kind: PartKind, params: dict[str, np.ndarray | float], setup: dict[str, float]) -> None:
        self.kind = kind
        self.params = params
        self.setup = setup
        self._station: tuple[np.ndarray, np.ndarray] | None = None

    def station(self, grid: _Grid) -> tuple[np.ndarray, np.ndarray]:
        """Field-of-view mask and illumination (with gain) of this series' set-up, computed once."""
        if self._station is None:
            light = _illumination(self.setup, grid) * np.float32(self.setup["gain"] / 1.03)
            self._station = (_field_of_view(self.setup, grid), light)
        return self._station

    @classmethod
    def random(cls, kind: PartKind, rng: np.random.Generator, grid: _Grid) -> _PartShape:
        if kind == "wheel":
            params: dict[str, np.ndarray | float] = {
                "radius": grid.scale * rng.uniform(1.3, 1.7),
                "spokes": float(rng.integers(5, 8)),
                "spoke_width": rng.uniform(0.075, 0.1),
                "bolts": float(rng.integers(4, 6)),
                "hub": rng.uniform(0.2, 0.25),
                "rim": rng.uniform(0.8, 0.86),
                "t_spoke": rng.uniform(16, 24),
                "t_hub": rng.uniform(26, 34),
                "t_rim": rng.uniform(30, 40),
                "anchor_r": rng.uniform(0.35, 0.55),
            }
        else:
            params = {
                "radius": grid.scale * rng.uniform(0.55, 0.75),
                "harm_amp": rng.uniform(0.0, 0.1, size=4) / np.sqrt(np.arange(2, 6)),
                "harm_phase": rng.uniform(0, 2 * np.pi, size=4),
                "arm_angle": rng.uniform(0, 2 * np.pi, size=3),
                "arm_len": rng.uniform(0.35, 0.6, size=3),
                "arm_width": rng.uniform(0.12, 0.2, size=3),
                "bore_xy": rng.uniform(-0.4, 0.4, size=(3, 2)),
                "bore_r": rng.uniform(0.06, 0.13, size=3),
                "bores": float(rng.integers(1, 4)),
                "t_body": rng.uniform(16, 26),
                "wave_k": rng.uniform(1.0, 3.0, size=(2, 2)),
                "wave_phase": rng.uniform(0, 2 * np.pi, size=2),
                "anchor_r": rng.uniform(0.0, 0.25),
            }
        setup = {
            "fov_dx": rng.uniform(-0.02, 0.02) * grid.width,
            "fov_dy": rng.uniform(-0.02, 0.02) * grid.height,
            "fov_r": rng.uniform(0.49, 0.53) * max(grid.width, grid.height * 4 / 3),
            "heel_angle": rng.uniform(0, 2 * np.pi),
            "heel": rng.uniform(0.04, 0.1),
            "gain": rng.uniform(0.8, 0.9),
            "anchor_angle": rng.uniform(0, 2 * np.pi),
        }
        return cls(kind, params, setup)


def _render(
    shape: _PartShape,
    grid: _Grid,
    key: tuple[int, int, int],
    *,
    want_defects: bool,
    bit_depth: int,
    contrast: float = 1.0,
) -> tuple[np.ndarray, list[tuple[DefectKind, tuple[int, int, int, int]]]]:
    """One view of the part: pixels (uint8/uint16) and the defects as (kind, (x1, y1, x2, y2)).

    View, defects and noise draw from separate generators, so the same image rendered with and
    without defects differs only around the defects (paired data, and a testable property).
    """
    rng = np.random.default_rng([*key, 0])
    u, v = _view_coordinates(shape, grid, rng)
    coarse = _wheel(shape.params, u, v) if shape.kind == "wheel" else _knuckle(shape.params, u, v)
    thickness = cv2.resize(coarse, (grid.width, grid.height), interpolation=cv2.INTER_LINEAR)
    fov, light = shape.station(grid)
    attenuation = thickness * np.float32(MU_AL)
    defects: list[tuple[DefectKind, tuple[int, int, int, int]]] = []
    if want_defects:
        defects = _add_defects(attenuation, thickness, fov, np.random.default_rng([*key, 1]), contrast)
    transmitted = np.exp(-attenuation)
    transmitted += np.float32(0.03)  # scatter: lifts the dark end and lowers contrast, as in real images
    signal = transmitted * light
    signal = cv2.GaussianBlur(signal, (0, 0), sigmaX=rng.uniform(0.9, 1.3))  # focal spot + intensifier blur
    signal = signal * fov + np.float32(0.04) * (1 - fov)
    # Quantum noise grows with the signal (Poisson, here in its Gaussian limit), read noise does not.
    sigma = np.sqrt(signal * np.float32(3e-5) + np.float32(2.5e-6))
    noise = np.random.default_rng([*key, 2]).standard_normal(signal.shape, dtype=np.float32)
    signal += sigma * noise
    full = 255.0 if bit_depth == 8 else 65535.0
    pixels = np.clip(signal * np.float32(full) + np.float32(0.5), 0, full)
    return pixels.astype(np.uint8 if bit_depth == 8 else np.uint16), defects


def _view_coordinates(shape: _PartShape, grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Part coordinates (units of the part radius) of every pixel, for a jittered view."""
    radius = float(shape.params["radius"]) * rng.uniform(0.9, 1.1)
    angle = rng.uniform(0, 2 * np.pi) if shape.kind == "wheel" else rng.uniform(-0.4, 0.4)
    anchor_angle = shape.setup["anchor_angle"] + rng.uniform(-0.3, 0.3)
    anchor_r = float(shape.params["anchor_r"]) + rng.uniform(-0.05, 0.05)
    ax, ay = anchor_r * math.cos(anchor_angle), anchor_r * math.sin(anchor_angle)
    c, s = math.cos(angle), math.sin(angle)
    dx = (grid.coarse_x - grid.width / 2) / radius
    dy = (grid.coarse_y - grid.height / 2) / radius
    u = c * dx - s * dy + np.float32(ax)
    v = s * dx + c * dy + np.float32(ay)
    return u.astype(np.float32), v.astype(np.float32)


def _smooth_disc(dist: np.ndarray, radius: float, edge: float) -> np.ndarray:
    """1 inside `radius`, 0 outside, with a linear ramp `edge` wide (avoids aliased outlines)."""
    return np.clip((radius - dist) / edge + 0.5, 0, 1)


def _wheel(p: dict[str, np.ndarray | float], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Thickness (mm) of a wheel seen along its axis: hub with bore and bolt holes, spokes, rim."""
    r = np.hypot(u, v)
    phi = np.arctan2(v, u)
    hub, rim_in = float(p["hub"]), float(p["rim"])
    edge = 0.006

    n = float(p["spokes"])
    period = 2 * np.pi / n
    dphi = np.mod(phi, period) - period / 2
    d = r * np.abs(np.sin(dphi))  # distance to the spoke's centre line
    # Spokes widen into fillets where they meet the hub and the rim.
    half = float(p["spoke_width"]) * (1 + 1.3 * np.exp(-(r - hub) / 0.06) + 1.1 * np.exp(-(rim_in - r) / 0.05))
    across = np.sqrt(np.clip(1 - (d / half) ** 4, 0, 1))
    along = _smooth_disc(np.abs(r - (hub + rim_in) / 2), (rim_in - hub) / 2 + 0.03, edge)
    pocket = _smooth_disc(np.abs(r - 0.52), 0.1, 0.06) * _smooth_disc(d / half, 0.45, 0.4)
    spokes = float(p["t_spoke"]) * across * along * (1 - 0.25 * pocket)

    hub_t = float(p["t_hub"]) * np.sqrt(np.clip(1 - (r / hub) ** 8, 0, 1))
    bolts = float(p["bolts"])
    bperiod = 2 * np.pi / bolts
    bphi = np.mod(phi + bperiod / 2, bperiod) - bperiod / 2
    bolt_r = 0.62 * hub
    db = np.hypot(r * np.cos(bphi) - bolt_r, r * np.sin(bphi))
    hole = 0.16 * hub
    hub_t = hub_t + 8.0 * _smooth_disc(db, 1.9 * hole, 0.01)  # boss around each bolt hole

    ring = np.clip(1 - ((r - (rim_in + 0.07)) / 0.07) ** 2, 0, 1)
    rim_t = float(p["t_rim"]) * np.sqrt(ring) + 12.0 * _smooth_disc(np.abs(r - rim_in), 0.015, edge)

    thickness = np.maximum(np.maximum(spokes, hub_t), rim_t)
    thickness *= 1 - _smooth_disc(db, hole, edge)
    thickness *= 1 - _smooth_disc(r, 0.3 * hub, edge)  # centre bore
    return thickness.astype(np.float32)


def _knuckle(p: dict[str, np.ndarray | float], u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Thickness (mm) of a knuckle-like body: irregular outline, lugs, bores and uneven walls."""
    r = np.hypot(u, v)
    phi = np.arctan2(v, u)
    amp = np.asarray(p["harm_amp"])
    phase = np.asarray(p["harm_phase"])
    outline = np.ones_like(r)
    for k in range(4):
        outline += np.float32(amp[k]) * np.cos((k + 2) * phi + np.float32(phase[k]))
    rho = r / outline
    t_body = float(p["t_body"])
    thickness = t_body * np.sqrt(np.clip(1 - rho**4, 0, 1))
    for a, length, width in zip(
        np.asarray(p["arm_angle"]), np.asarray(p["arm_len"]), np.asarray(p["arm_width"]), strict=True
    ):
        ca, sa = math.cos(a), math.sin(a)
        along = (u * ca + v * sa - (0.8 + length / 2)) / (length / 2 + 0.4)
        across = (-u * sa + v * ca) / width
        arm = 0.7 * t_body * np.sqrt(np.clip(1 - along**2 - across**2, 0, 1))
        thickness = np.maximum(thickness, arm)
    waves = np.asarray(p["wave_k"])
    wphase = np.asarray(p["wave_phase"])
    for k in range(2):
        thickness *= 1 + 0.12 * np.cos(waves[k, 0] * u + waves[k, 1] * v + np.float32(wphase[k]))
    bores = int(p["bores"])
    centres = np.asarray(p["bore_xy"])
    radii = np.asarray(p["bore_r"])
    for b in range(bores):
        db = np.hypot(u - np.float32(centres[b, 0]), v - np.float32(centres[b, 1]))
        boss = _smooth_disc(db, 1.6 * radii[b], 0.02) * 6.0
        thickness = (thickness + boss * (thickness > 1)) * (1 - _smooth_disc(db, radii[b], 0.006))
    return thickness.astype(np.float32)


def _field_of_view(setup: dict[str, float], grid: _Grid) -> np.ndarray:
    """1 inside the image intensifier's circular field, 0 outside, with a soft edge."""
    dist = np.hypot(grid.x - (grid.width / 2 + setup["fov_dx"]), grid.y - (grid.height / 2 + setup["fov_dy"]))
    return _smooth_disc(dist, setup["fov_r"], 4.0).astype(np.float32)


def _illumination(setup: dict[str, float], grid: _Grid) -> np.ndarray:
    """Heel effect (linear ramp) times intensifier vignetting (brighter in the centre)."""
    ca, sa = math.cos(setup["heel_angle"]), math.sin(setup["heel_angle"])
    nx = (grid.x - grid.width / 2) / grid.width
    ny = (grid.y - grid.height / 2) / grid.width
    ramp = 1 + setup["heel"] * 2 * (nx * ca + ny * sa)
    vignette = 1 - 0.12 * (nx * nx + ny * ny) * 4
    return (ramp * vignette).astype(np.float32)


def _add_defects(
    attenuation: np.ndarray,
    thickness: np.ndarray,
    fov: np.ndarray,
    rng: np.random.Generator,
    contrast: float = 1.0,
) -> list[tuple[DefectKind, tuple[int, int, int, int]]]:
    """Place 1-3 defects on metal, changing `attenuation` in place; returns their tight boxes."""
    height, width = attenuation.shape
    wanted = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    allowed = (thickness > MIN_METAL_MM) & (fov > 0.99)
    candidates = np.flatnonzero(allowed[::4, ::4])  # a coarse grid is plenty to pick centres from
    placed: list[tuple[DefectKind, tuple[int, int, int, int]]] = []
    if candidates.size == 0:
        return placed
    coarse_w = allowed[::4, ::4].shape[1]
    for _ in range(wanted):
        kind: DefectKind = _DEFECT_KINDS[int(rng.choice(len(_DEFECT_KINDS), p=_DEFECT_WEIGHTS))]
        delta, mask = _defect_patch(kind, rng)
        delta = delta * np.float32(contrast)
        ph, pw = delta.shape
        for _try in range(40):
            c = int(candidates[rng.integers(candidates.size)])
            cy, cx = (c // coarse_w) * 4, (c % coarse_w) * 4
            y0, x0 = cy - ph // 2, cx - pw // 2
            if y0 < 0 or x0 < 0 or y0 + ph > height or x0 + pw > width:
                continue
            region = (slice(y0, y0 + ph), slice(x0, x0 + pw))
            if not allowed[region][mask].all():
                continue
            ys, xs = np.nonzero(mask)
            box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
            if any(_overlaps(box, other, margin=4) for _, other in placed):
                continue
            if kind == "inclusion":
                attenuation[region] += delta
            else:
                # A void can never remove more metal than there is.
                local = attenuation[region]
                local += np.maximum(delta, -0.5 * local)
            placed.append((kind, box))
            break
    return placed


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int], margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _defect_patch(kind: DefectKind, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation change (negative: less metal) and its support mask, with a tight box of 10-40 px."""
    for _ in range(20):
        if kind == "pore":
            delta = _pore(rng)
        elif kind == "shrinkage":
            delta = _shrinkage(rng)
        elif kind == "crack":
            delta = _crack(rng)
        else:
            delta = _inclusion(rng)
        mask = np.abs(delta) > 0.1 * np.abs(delta).max()
        ys, xs = np.nonzero(mask)
        h, w = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        if min(h, w) >= MIN_BOX and max(h, w) <= MAX_BOX:
            return delta, mask
    delta = _pore(rng)  # always fits: its ellipse fills its patch
    return delta, np.abs(delta) > 0.1 * np.abs(delta).max()


def _ellipsoid(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Chord length through an ellipsoid, normalised to 1 at its centre (the projection of a void)."""
    y = (np.arange(h, dtype=np.float32)[:, None] + 0.5 - cy) / ry
    x = (np.arange(w, dtype=np.float32)[None, :] + 0.5 - cx) / rx
    return np.sqrt(np.clip(1 - x * x - y * y, 0, 1))


def _pore(rng: np.random.Generator) -> np.ndarray:
    h, w = (int(n) for n in rng.integers(MIN_BOX + 1, 33, size=2))
    if rng.random() < 0.6:  # most gas pores are nearly round
        w = int(np.clip(h + rng.integers(-3, 4), MIN_BOX + 1, 32))
    depth = rng.uniform(0.12, 0.25)
    return (-depth * _ellipsoid(h, w, h / 2, w / 2, h / 2, w / 2)).astype(np.float32)


def _shrinkage(rng: np.random.Generator) -> np.ndarray:
    """A spongy cluster of small voids, denser in the middle."""
    size = int(rng.integers(18, MAX_BOX + 1))
    delta = np.zeros((size, size), dtype=np.float32)
    for _ in range(int(rng.integers(8, 20))):
        r = rng.uniform(1.5, 4.5)
        cy, cx = np.clip(rng.normal(size / 2, size / 5, size=2), r, size - r)
        delta -= rng.uniform(0.05, 0.12) * _ellipsoid(size, size, cy, cx, r, r * rng.uniform(0.7, 1.4))
    return np.maximum(delta, -0.25)


def _crack(rng: np.random.Generator) -> np.ndarray:
    """A thin jagged line (midpoint displacement), drawn anti-aliased, 1-2 px wide."""
    h, w = (int(n) for n in rng.integers(14, MAX_BOX + 1, size=2))
    points = np.array([[1.0, rng.uniform(1, 3)], [w - 2.0, h - rng.uniform(2, 4)]])
    for _level in range(4):
        mids = (points[:-1] + points[1:]) / 2
        seg = np.linalg.norm(points[1:] - points[:-1], axis=1, keepdims=True)
        mids += rng.normal(0, 0.18, size=mids.shape) * seg
        points = np.insert(points, np.arange(1, len(points)), mids, axis=0)
    points[:, 0] = np.clip(points[:, 0], 1, w - 2)
    points[:, 1] = np.clip(points[:, 1], 1, h - 2)
    canvas = np.zeros((h, w), dtype=np.uint8)
    cv2.polylines(canvas, [np.round(points * 16).astype(np.int32)], False, 255, int(rng.integers(1, 3)),
                  cv2.LINE_AA, shift=4)  # fmt: skip
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
    return (-rng.uniform(0.15, 0.3) / 255.0 * canvas.astype(np.float32)).astype(np.float32)


def _inclusion(rng: np.random.Generator) -> np.ndarray:
    """A dense irregular particle: positive attenuation change (darker)."""
    size = int(rng.integers(MIN_BOX + 1, 25))
    y = np.arange(size, dtype=np.float32)[:, None] + 0.5 - size / 2
    x = np.arange(size, dtype=np.float32)[None, :] + 0.5 - size / 2
    phi = np.arctan2(y, x)
    outline = (size / 2) * (1 + 0.15 * np.cos(3 * phi + rng.uniform(0, 6.3)) - 0.1 * np.abs(np.sin(2 * phi)))
    shape = np.sqrt(np.clip(1 - (np.hypot(x, y) / outline) ** 2, 0, 1))
    thickness_mm = rng.uniform(0.8, 1.6) * shape
    return ((MU_INCLUSION - MU_AL) * thickness_mm).astype(np.float32)


def _encode_png(pixels: np.ndarray) -> bytes:
    ok, buffer = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise DatasetError(f"could not encode a {pixels.dtype} image of shape {pixels.shape} as PNG")
    return buffer.tobytes()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary name in the same folder, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _readme(seed: int, images: int, size: tuple[int, int], bit_depth: int) -> str:
    return f"""{README_MARKER}

Synthetic radiographs of aluminium castings written by `export.synth.generate` (seed {seed},
{images} images of {size[1]}x{size[0]} pixels, {bit_depth}-bit PNG). Not real data: use it for tests,
demos and pipeline checks, never to claim detection performance on real castings.

Layout as GDXray: `Castings/Sxxxx/Sxxxx_nnnn.png`, one part (wheel or knuckle) per series, its images
being different views. `Castings/Sxxxx/ground_truth.txt` holds one defect box per line,
`image_no x1 x2 y1 y2` (both x first, then both y), pixels, x2/y2 exclusive; an empty file means all
images of the series are defect-free. Defects: gas pores, shrinkage clusters, cracks (less metal,
brighter) and inclusions (denser, darker). 16-bit files use the full 0-65535 range.
The same seed and arguments give byte-identical files.
"""
