"""Simulated defects on real defect-free radiographs, and copy-paste of real defects.

GDXray's training split holds a few hundred annotated defects; the networks need many more. So new
positives are made on verified defect-free training images:

- **Physics** (`render`): a void of chord length d (mm) along each ray removes metal, so the grey
  value becomes ``J = exp(mu * d) * (I - q) + q`` (q: the grey value of infinite thickness, mu: the
  attenuation coefficient); a denser inclusion adds attenuation, ``J = exp(-mu * d) * (I - q) + q``.
  d is the exact ray-length through a union of randomly sized and rotated 3-D ellipsoids: one for a
  pore, a bent chain for shrinkage, a long thin one for a crack. The change is blurred by the
  detector's unsharpness, gets the extra quantum noise of the brighter signal, is confined to the
  part, and its box is the tight box of the pixels whose noise-free change exceeds a fraction of the
  peak change.
- **Copy-paste** (`CopyPaste`): a real annotated defect's residual against an inpainted background,
  relative to the local signal ``I - q``, pasted elsewhere inside a part with the same relative law.

Only ever fed with training-split images: the sampler that uses it is built from them alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import cv2
import numpy as np

from lineside.agent.errors import DatasetError
from lineside.agent.models.part_mask import NoPartError, part_mask
from lineside.export.tiles import LoadedImage, TileSampler

logger = logging.getLogger(__name__)

DefectKind = Literal["pore", "shrinkage", "crack", "inclusion"]
KINDS: tuple[DefectKind, ...] = ("pore", "shrinkage", "crack", "inclusion")


@dataclass(frozen=True)
class SimConfig:
    """Ranges the simulator draws from (uniform unless said otherwise)."""

    # Geometric magnification, log-uniform. GDXray wheels: 10-40 px defects of a few mm; a wider range teaches the
    # detector the same defects at the sizes another line's magnification (or a larger void) gives.
    px_per_mm: tuple[float, float] = (2.5, 3.5)
    pore_semi_axis_mm: tuple[float, float] = (1.2, 6.0)  # log-uniform; 3-D pores are roughly round
    mu_void: tuple[float, float] = (0.03, 0.09)  # 1/mm, effective after the detector's response
    mu_inclusion: tuple[float, float] = (0.01, 0.04)  # extra attenuation of the denser material
    blur_sigma: tuple[float, float] = (0.8, 1.6)  # px: intensifier / detector unsharpness
    kind_weights: tuple[float, float, float, float] = (0.55, 0.25, 0.1, 0.1)  # pore, shrinkage, crack, inclusion
    box_fraction: float = 0.1  # box = pixels changing by more than this share of the peak change
    min_box: float = 6.0  # px: smaller defects are drawn again (GDXray boxes are >= ~8 px)
    mask_erode: int = 8  # px kept between a defect centre and the part's edge
    # Share of pores drawn flat: shallow along the beam (a sheet of shrinkage or a pore squeezed by the wall), so a
    # large void changes the grey value by a few percent only, as the large rim defects of GDXray's C0007 do. A round
    # pore of that projected size would change it by 40 % or more.
    flat_share: float = 0.0
    flat_depth: tuple[float, float] = (0.08, 0.4)  # log-uniform: depth along the beam / the in-plane semi-axes
    # Share of defects centred on the steep edges inside the part (where a thick section meets a thin one), which
    # the part mask otherwise keeps every defect away from; GDXray's C0007 and C0019 defects sit on such edges.
    edge_share: float = 0.0

    @classmethod
    def chosen(
        cls, px_per_mm: tuple[float, float] | None = None, flat_share: float = 0.0, edge_share: float = 0.0
    ) -> SimConfig:
        """The default ranges with the command line's choices (`--sim-px-per-mm`, `--sim-flat`, `--sim-edges`)."""
        return cls(px_per_mm=px_per_mm or cls.px_per_mm, flat_share=flat_share, edge_share=edge_share)


# -- geometry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ellipsoid:
    """A 3-D ellipsoid: centre (x, y) in pixels of the image plane, semi-axes in mm, rotation matrix.

    The ray runs along z; points p inside satisfy (p - c)^T R diag(1/a^2) R^T (p - c) <= 1.
    """

    cx: float
    cy: float
    axes_mm: tuple[float, float, float]
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    cz_mm: float = 0.0  # depth offset: only matters for unions along the same ray

    def quadric(self) -> np.ndarray:
        return self.rotation @ np.diag([1.0 / a**2 for a in self.axes_mm]) @ self.rotation.T


def ray_intervals(ell: Ellipsoid, u_mm: np.ndarray, v_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(z_in, z_out) in mm where rays at offsets (u, v) mm from the centre cross the ellipsoid (NaN: miss)."""
    a = ell.quadric()
    b = a[0, 2] * u_mm + a[1, 2] * v_mm
    c = a[0, 0] * u_mm**2 + 2 * a[0, 1] * u_mm * v_mm + a[1, 1] * v_mm**2 - 1.0
    disc = b * b - a[2, 2] * c
    root = np.sqrt(np.where(disc > 0, disc, np.nan))
    # Roots of a22 z^2 + 2 b z + c = 0.
    return ell.cz_mm + (-b - root) / a[2, 2], ell.cz_mm + (-b + root) / a[2, 2]


def chord_length_mm(ellipsoids: Sequence[Ellipsoid], xs: np.ndarray, ys: np.ndarray, px_per_mm: float) -> np.ndarray:
    """Length (mm) of the union of the ellipsoids along the ray through each pixel centre (xs, ys px)."""
    starts, ends = [], []
    for ell in ellipsoids:
        z0, z1 = ray_intervals(ell, (xs - ell.cx) / px_per_mm, (ys - ell.cy) / px_per_mm)
        starts.append(np.where(np.isnan(z0), np.inf, z0))
        ends.append(np.where(np.isnan(z1), -np.inf, z1))
    if not starts:
        return np.zeros(np.broadcast(xs, ys).shape)
    s, e = np.stack(starts), np.stack(ends)
    order = np.argsort(s, axis=0)
    s, e = np.take_along_axis(s, order, 0), np.take_along_axis(e, order, 0)
    # Sweep the intervals in order of entry: overlapping parts are counted once (a union, not a sum).
    total = np.zeros(s.shape[1:])
    reach = np.full(s.shape[1:], -np.inf)
    for k in range(s.shape[0]):
        lo = np.maximum(s[k], reach)
        total += np.where(np.isfinite(s[k]) & (e[k] > lo), e[k] - lo, 0.0)
        reach = np.maximum(reach, e[k])
    return total


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _axis_rotation(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rotation whose first column is `direction` (unit), the other two random around it."""
    d = direction / np.linalg.norm(direction)
    helper = rng.normal(size=3)
    e2 = helper - helper.dot(d) * d
    e2 /= np.linalg.norm(e2)
    return np.stack([d, e2, np.cross(d, e2)], axis=1)


@dataclass(frozen=True)
class Defect:
    """One simulated defect: its shape (ellipsoids centred near the origin, pixels), sign and mu."""

    kind: DefectKind
    ellipsoids: tuple[Ellipsoid, ...]
    mu_per_mm: float
    sign: int  # +1 void (brighter), -1 inclusion (darker)
    px_per_mm: float

    def moved(self, dx: float, dy: float) -> Defect:
        moved = tuple(Ellipsoid(e.cx + dx, e.cy + dy, e.axes_mm, e.rotation, e.cz_mm) for e in self.ellipsoids)
        return Defect(self.kind, moved, self.mu_per_mm, self.sign, self.px_per_mm)

    def radius_px(self) -> float:
        """A radius (pixels, around the origin) that holds the whole projection."""
        return max(math.hypot(e.cx, e.cy) + max(e.axes_mm) * self.px_per_mm for e in self.ellipsoids)


def random_defect(rng: np.random.Generator, config: SimConfig, kind: DefectKind | None = None) -> Defect:
    """A random pore, shrinkage chain, crack or inclusion centred at (0, 0)."""
    if kind is None:
        w = np.asarray(config.kind_weights, float)
        kind = KINDS[int(rng.choice(len(KINDS), p=w / w.sum()))]
    lo, hi = config.pore_semi_axis_mm

    def log_uniform(a: float, b: float) -> float:
        return float(np.exp(rng.uniform(np.log(a), np.log(b))))

    ppm = log_uniform(*config.px_per_mm)

    parts: list[Ellipsoid] = []
    if kind == "pore" and config.flat_share > 0 and rng.random() < config.flat_share:
        # Flat: the third axis (the thin one, a share of r) is tilted from the beam by ~20 degrees (median; up to
        # ~55), so the projection stays large.
        r = log_uniform(lo, hi)
        depth = log_uniform(*config.flat_depth)
        axes = (r * rng.uniform(0.7, 1.3), r * rng.uniform(0.35, 1.0), r * depth)
        normal = np.array([*(0.35 * rng.normal(size=2)), 1.0])
        rot = _axis_rotation(normal, rng)[:, [1, 2, 0]]  # columns: two in-plane axes, then the normal
        parts.append(Ellipsoid(0.0, 0.0, axes, rot))
    elif kind in ("pore", "inclusion"):
        r = log_uniform(lo, hi * (0.6 if kind == "inclusion" else 1.0))
        axes = tuple(r * rng.uniform(0.7, 1.3) for _ in range(3))
        parts.append(Ellipsoid(0.0, 0.0, axes, random_rotation(rng)))  # type: ignore[arg-type]
    elif kind == "shrinkage":
        # A bent chain of small voids (a dendritic shrinkage cluster seen in projection).
        n = int(rng.integers(3, 9))
        step = log_uniform(0.8, 2.5)
        pos = np.zeros(3)
        heading = rng.normal(size=3)
        for _ in range(n):
            r = step * rng.uniform(0.5, 1.0)
            axes = (r * rng.uniform(1.0, 2.0), r * rng.uniform(0.5, 1.0), r * rng.uniform(0.5, 1.0))
            rot = _axis_rotation(heading + 0.3 * rng.normal(size=3), rng)
            parts.append(Ellipsoid(pos[0] * ppm, pos[1] * ppm, axes, rot, pos[2]))
            heading = heading / np.linalg.norm(heading) + 0.8 * rng.normal(size=3)
            pos = pos + step * heading / np.linalg.norm(heading)
        centre = np.mean([(e.cx, e.cy) for e in parts], axis=0)
        parts = [Ellipsoid(e.cx - centre[0], e.cy - centre[1], e.axes_mm, e.rotation, e.cz_mm) for e in parts]
    else:  # crack: long, thin, lying mostly across the beam; one or two slightly kinked segments
        length = log_uniform(3.0, 10.0)
        direction = np.array([*rng.normal(size=2), 0.3 * rng.normal()])
        segments = int(rng.integers(1, 3))
        offset = np.zeros(3)
        for _ in range(segments):
            d = direction + 0.3 * rng.normal(size=3)
            d /= np.linalg.norm(d)
            axes = (length / segments, rng.uniform(0.15, 0.4), rng.uniform(0.8, 2.5))
            parts.append(Ellipsoid(offset[0] * ppm, offset[1] * ppm, axes, _axis_rotation(d, rng), offset[2]))
            offset = offset + d * 1.8 * length / segments
        centre = np.mean([(e.cx, e.cy) for e in parts], axis=0)
        parts = [Ellipsoid(e.cx - centre[0], e.cy - centre[1], e.axes_mm, e.rotation, e.cz_mm) for e in parts]
    mu_range = config.mu_inclusion if kind == "inclusion" else config.mu_void
    mu = float(rng.uniform(*mu_range))
    if kind == "crack":
        mu *= 2.0  # a crack is thin along most rays: without this it would be invisible
    return Defect(kind, tuple(parts), mu, -1 if kind == "inclusion" else 1, ppm)


# -- the image ------------------------------------------------------------------------------------


@dataclass
class Background:
    """What the simulator needs to know about one radiograph (windowed [0, 1] grey values)."""

    unit: np.ndarray
    smooth: np.ndarray  # the noise-free signal estimate the multiplicative law applies to
    mask: np.ndarray  # bool: inside the casting, with a margin from its edges
    q: float  # grey value of infinite thickness
    noise: float  # std of the pixel noise
    # Only with SimConfig.edge_share: the part with its steep edges (never free air or the no-signal black), and the
    # band of steep edges inside it where edge defects are centred.
    with_edges: np.ndarray | None = None
    edges: np.ndarray | None = None


def analyse(unit: np.ndarray, config: SimConfig | None = None) -> Background:
    """Part mask, infinite-thickness level q and noise level of one image (and, with `config.edge_share`,
    the part with its steep edges and the band of them where edge defects are centred)."""
    config = config or SimConfig()
    unit = np.asarray(unit, np.float32)
    mask = part_mask(unit, erode=config.mask_erode)
    smooth = cv2.GaussianBlur(unit, (0, 0), 1.5)
    # q: the detector's zero-signal level; the darkest plateau is a close upper bound on it
    # (thick metal or the black outside the field of view), never above the part's own darkest pixels.
    q = float(min(np.percentile(smooth, 0.5), np.percentile(smooth[mask], 1.0) - 0.01))
    residual = (unit - smooth)[mask]
    noise = float(1.4826 * np.median(np.abs(residual - np.median(residual))))
    with_edges = edges = None
    if config.edge_share > 0:
        # Defects may reach within 2 px of air or black; their centres stay 6 px inside, off the outline.
        with_edges = part_mask(unit, erode=2, steep_edges=True)
        edges = part_mask(unit, erode=6, steep_edges=True, min_share=0.0) & ~part_mask(unit, erode=0, min_share=0.0)
        if not edges.any():
            with_edges = edges = None
    return Background(unit, smooth, mask, q, noise, with_edges, edges)


def render(
    bg: Background,
    defect: Defect,
    cx: float,
    cy: float,
    rng: np.random.Generator,
    *,
    blur_sigma: float = 1.2,
    noise: bool = True,
    box_fraction: float = 0.1,
    min_inside: float = 0.0,
    out: np.ndarray | None = None,
    part: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[float, float, float, float] | None]:
    """Add `defect` centred at pixel (cx, cy); returns (image, tight box x1,y1,x2,y2 or None if invisible).

    Writes into `out` (default: a copy of bg.unit). The change is zero outside `part` (default
    bg.mask). A defect whose footprint lies less than `min_inside` in the part is refused (None, image
    unchanged): one cut by the part's edge would teach a shape that does not exist.
    """
    part = bg.mask if part is None else part
    image = bg.unit.copy() if out is None else out
    h, w = image.shape
    margin = defect.radius_px() + 4 * blur_sigma + 2
    x0, x1 = max(0, int(cx - margin)), min(w, math.ceil(cx + margin) + 1)
    y0, y1 = max(0, int(cy - margin)), min(h, math.ceil(cy + margin) + 1)
    if x0 >= x1 or y0 >= y1:
        return image, None
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    shape = defect.moved(cx, cy)
    # Pixel i spans [i, i + 1): its ray passes through its centre.
    d = chord_length_mm(shape.ellipsoids, xs + 0.5, ys + 0.5, defect.px_per_mm)
    gain = np.expm1(defect.sign * defect.mu_per_mm * d)  # exp(+-mu d) - 1
    signal = bg.smooth[y0:y1, x0:x1] - bg.q
    # Blur the added signal (the change in transmitted intensity), as the detector blurs every signal.
    change = gain * signal if blur_sigma <= 0 else cv2.GaussianBlur(gain * signal, (0, 0), blur_sigma)
    if min_inside > 0:
        footprint = np.abs(change) > box_fraction * max(float(np.abs(change).max()), 1e-12)
        if part[y0:y1, x0:x1][footprint].mean() < min_inside:
            return image, None
    change *= part[y0:y1, x0:x1]
    peak = float(np.abs(change).max())
    if peak <= 0:
        return image, None
    patch = image[y0:y1, x0:x1]
    if blur_sigma <= 0 and not noise:
        # Exactly J = exp(+-mu d) (I - q) + q on the image's own pixels.
        patch += (gain * (patch - bg.q) * part[y0:y1, x0:x1]).astype(np.float32)
    else:
        patch += change.astype(np.float32)
    if noise and bg.noise > 0:
        # Quantum noise variance grows with the signal: add the missing part where it got brighter.
        ratio = np.clip(1.0 + change / np.maximum(signal, 1e-3), 0.0, None)
        extra = bg.noise * np.sqrt(np.clip(ratio - 1.0, 0.0, None))
        patch += (extra * rng.standard_normal(patch.shape)).astype(np.float32) * part[y0:y1, x0:x1]
    np.clip(patch, 0.0, 1.0, out=patch)
    rows, cols = np.nonzero(np.abs(change) > box_fraction * peak)
    box = (float(x0 + cols.min()), float(y0 + rows.min()), float(x0 + cols.max() + 1), float(y0 + rows.max() + 1))
    return image, box


def _inside(box: Sequence[float], within: tuple[int, int, int, int] | None) -> bool:
    if within is None:
        return True
    y0, x0, y1, x1 = within
    return box[0] >= x0 and box[1] >= y0 and box[2] <= x1 and box[3] <= y1


def _boxes_overlap(a: Sequence[float], b: Sequence[float], margin: float = 2.0) -> bool:
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def edge_pixels(bg: Background, region: tuple[int, int, int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(ys, xs) of the steep-edge band inside `region` (none without SimConfig.edge_share)."""
    if bg.edges is None:
        return np.zeros(0, np.intp), np.zeros(0, np.intp)
    edges = bg.edges
    if region is not None:
        y0, x0, y1, x1 = region
        edges = np.zeros_like(edges)
        edges[y0:y1, x0:x1] = bg.edges[y0:y1, x0:x1]
    return np.nonzero(edges)


def pick_site(
    bg: Background,
    rng: np.random.Generator,
    config: SimConfig,
    part_px: tuple[np.ndarray, np.ndarray],
    edge_px: tuple[np.ndarray, np.ndarray],
) -> tuple[float, float, np.ndarray, bool]:
    """A defect centre (x, y) among the (ys, xs) candidates and the mask it is rendered in, and whether it is on
    an edge: with `config.edge_share` (or when no part pixel is left) on the steep-edge band, else in the part."""
    (cys, cxs), (eys, exs) = part_px, edge_px
    on_edge = eys.size > 0 and (cys.size == 0 or rng.random() < config.edge_share)
    ys, xs = (eys, exs) if on_edge else (cys, cxs)
    i = int(rng.integers(ys.size))
    part = bg.with_edges if on_edge and bg.with_edges is not None else bg.mask
    return float(xs[i] + rng.random()), float(ys[i] + rng.random()), part, on_edge


def simulate(
    bg: Background,
    rng: np.random.Generator,
    n_defects: int = 1,
    config: SimConfig | None = None,
    *,
    region: tuple[int, int, int, int] | None = None,
    within: tuple[int, int, int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Up to `n_defects` non-overlapping defects inside the part.

    Centres lie in `region` and whole boxes in `within` where given (both y0, x0, y1, x1): a defect
    cut by a training tile's edge would be a positive without its box. Returns (image, boxes (K, 4)
    float32). Deterministic for a given rng state.
    """
    config = config or SimConfig()
    image = bg.unit.copy()
    mask = bg.mask
    if region is not None:
        y0, x0, y1, x1 = region
        mask = np.zeros_like(mask)
        mask[y0:y1, x0:x1] = bg.mask[y0:y1, x0:x1]
    cys, cxs = np.nonzero(mask)
    eys, exs = edge_pixels(bg, region) if config.edge_share > 0 else (cys[:0], cxs[:0])
    if cys.size == 0 and eys.size == 0:
        raise NoPartError("no part pixel in the requested region")
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(n_defects * 6):
        if len(boxes) >= n_defects:
            break
        defect = random_defect(rng, config)
        cx, cy, part, _ = pick_site(bg, rng, config, (cys, cxs), (eys, exs))
        trial, box = render(
            bg, defect, cx, cy, rng, blur_sigma=float(rng.uniform(*config.blur_sigma)),
            box_fraction=config.box_fraction, min_inside=0.98, out=image.copy(), part=part,
        )  # fmt: skip
        if box is None or min(box[2] - box[0], box[3] - box[1]) < config.min_box:
            continue
        if not _inside(box, within) or any(_boxes_overlap(box, b) for b in boxes):
            continue
        image = trial
        boxes.append(box)
    return image, np.asarray(boxes, np.float32).reshape(-1, 4)


# -- copy-paste of real defects ------------------------------------------------------------------


@dataclass(frozen=True)
class Residual:
    """A real defect cut out: its change relative to the local signal (I - q), and its box size."""

    relative: np.ndarray  # (h, w) float32, 0 at the border
    box: tuple[float, float, float, float]  # the defect's box within `relative`


def cut_residual(bg: Background, box: Sequence[float], margin: int = 6, min_signal: float = 0.1) -> Residual | None:
    """The defect in `box` minus an inpainted background, divided by the local signal I - q."""
    h, w = bg.unit.shape
    x1, y1, x2, y2 = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
    px0, py0, px1, py1 = max(0, x1 - margin), max(0, y1 - margin), min(w, x2 + margin), min(h, y2 + margin)
    if x2 - x1 < 3 or y2 - y1 < 3 or px1 - px0 < x2 - x1 + 4 or py1 - py0 < y2 - y1 + 4:
        return None
    patch = bg.unit[py0:py1, px0:px1].astype(np.float32)
    hole = np.zeros(patch.shape, np.uint8)
    hole[y1 - py0 : y2 - py0, x1 - px0 : x2 - px0] = 1
    # The background under the defect, filled in from around the box.
    smooth = cv2.GaussianBlur(patch, (0, 0), 1.0)
    # Normalised convolution from the pixels around the box (cv2.inpaint returns garbage on float32).
    known = (1 - hole).astype(np.float32)
    sigma = max(x2 - x1, y2 - y1) / 2
    fill = cv2.GaussianBlur(smooth * known, (0, 0), sigma) / np.maximum(cv2.GaussianBlur(known, (0, 0), sigma), 1e-6)
    base = np.where(hole > 0, fill, smooth)
    signal = base - bg.q
    if float(signal[hole > 0].min()) < min_signal:
        return None  # a dark source: its noise, divided by a small signal, would be pasted as a defect
    # Feather the box edge so the pasted defect has no seam; the smoothed patch keeps the source's
    # noise out (the target brings its own).
    feather = cv2.GaussianBlur(hole.astype(np.float32), (0, 0), 1.5) * (hole > 0)
    relative = np.clip((smooth - base) / np.maximum(signal, 1e-3), -0.5, 1.0) * feather
    return Residual(relative.astype(np.float32), (float(x1 - px0), float(y1 - py0), float(x2 - px0), float(y2 - py0)))


def paste(
    bg: Background, residual: Residual, cx: float, cy: float, rng: np.random.Generator, out: np.ndarray | None = None
) -> tuple[np.ndarray, tuple[float, float, float, float] | None]:
    """Paste a residual (randomly flipped/transposed) centred at (cx, cy): J = I + r (I_smooth - q), in the part."""
    image = bg.unit.copy() if out is None else out
    rel, (bx1, by1, bx2, by2) = residual.relative, residual.box
    ph, pw = rel.shape
    if rng.random() < 0.5:
        rel, bx1, bx2 = rel[:, ::-1], pw - bx2, pw - bx1
    if rng.random() < 0.5:
        rel, by1, by2 = rel[::-1], ph - by2, ph - by1
    if rng.random() < 0.5:
        rel, (bx1, by1, bx2, by2) = rel.T, (by1, bx1, by2, bx2)
    ph, pw = rel.shape
    x0, y0 = round(cx - pw / 2), round(cy - ph / 2)
    h, w = image.shape
    if x0 < 0 or y0 < 0 or x0 + pw > w or y0 + ph > h:
        return image, None
    inside = bg.mask[y0 : y0 + ph, x0 : x0 + pw]
    if inside.mean() < 0.95:  # a defect cut by the part edge would teach the wrong shape
        return image, None
    change = rel * (bg.smooth[y0 : y0 + ph, x0 : x0 + pw] - bg.q) * inside
    image[y0 : y0 + ph, x0 : x0 + pw] = np.clip(image[y0 : y0 + ph, x0 : x0 + pw] + change, 0.0, 1.0)
    return image, (x0 + bx1, y0 + by1, x0 + bx2, y0 + by2)


# -- training tiles -------------------------------------------------------------------------------


def name_list(names: Sequence[str], shown: int = 5) -> str:
    """The first `shown` names, comma-separated, '...' when there are more (logs and reports)."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


class SimulatedTiles:
    """Positive training tiles made on defect-free training images (physics and/or copy-paste).

    `normals` are the verified defect-free images of the training split, `defective` the annotated
    defective ones (sources for copy-paste). Per-image analysis is cached on first use; images on
    which no part is found are dropped (logged once).
    """

    def __init__(
        self,
        normals: Sequence[tuple[str, np.ndarray]],
        size: int,
        pad: float,
        rng: np.random.Generator,
        *,
        defective: Sequence[tuple[str, np.ndarray, np.ndarray]] = (),
        paste_share: float = 0.0,
        config: SimConfig | None = None,
        max_defects: int = 3,
    ) -> None:
        self.size, self.pad, self.rng = size, pad, rng
        self.config = config or SimConfig()
        self.max_defects = max_defects
        self.paste_share = paste_share
        self.backgrounds: list[Background] = []
        self.no_part: list[str] = []  # defect-free images the part mask found no part on: not simulated on
        for name, unit in normals:
            try:
                self.backgrounds.append(analyse(unit, self.config))
            except NoPartError:
                self.no_part.append(name)
        if not self.backgrounds:
            raise DatasetError(
                f"the part mask found no part on any of the {len(normals)} defect-free training image(s): "
                "nothing to simulate defects on (switch simulation off, or check the images' exposure)"
            )
        if self.no_part:
            logger.warning(
                "simulation: the part mask found no part on %d of %d defect-free training images (%s): "
                "they are not simulated on",
                len(self.no_part),
                len(normals),
                name_list(self.no_part),
            )
        self.residuals: list[Residual] = []
        if paste_share > 0:
            for _name, unit, boxes in defective:
                try:
                    bg = analyse(unit, self.config)
                except NoPartError:
                    continue
                self.residuals += [r for b in boxes if (r := cut_residual(bg, b)) is not None]
            if not self.residuals:
                raise DatasetError("copy-paste: no real defect could be cut from the training images")
        logger.info(
            "simulation: %d defect-free backgrounds, %d real defects for copy-paste",
            len(self.backgrounds),
            len(self.residuals),
        )

    def summary(self) -> dict[str, Any]:
        """What the simulator drew on, for the run record (train.json) and the recipe's report."""
        return {
            "normals": len(self.backgrounds) + len(self.no_part),
            "backgrounds": len(self.backgrounds),
            "no_part": list(self.no_part),
            "copy_paste_defects": len(self.residuals),
        }

    def __call__(self) -> tuple[np.ndarray, np.ndarray]:
        """One tile (size x size) with 1..max_defects defects, and their boxes in tile pixels."""
        for _ in range(20):
            bg = self.backgrounds[int(self.rng.integers(len(self.backgrounds)))]
            tile, boxes = self._tile(bg)
            if len(boxes):
                return tile, boxes
        raise DatasetError("simulation: 20 tries in a row placed no visible defect")

    def _tile(self, bg: Background) -> tuple[np.ndarray, np.ndarray]:
        h, w = bg.unit.shape
        s = self.size
        cys, cxs = np.nonzero(bg.mask)
        if bg.edges is not None and self.rng.random() < self.config.edge_share:
            cys, cxs = np.nonzero(bg.edges)  # a tile around the edges its edge defects go on
        i = int(self.rng.integers(cys.size))
        # A tile around a random part pixel, the defects anywhere inside it (away from the tile edge).
        y = int(np.clip(cys[i] - self.rng.integers(16, max(17, s - 16)), 0, max(0, h - s)))
        x = int(np.clip(cxs[i] - self.rng.integers(16, max(17, s - 16)), 0, max(0, w - s)))
        ch, cw = min(s, h - y), min(s, w - x)
        region = (y + 12, x + 12, y + ch - 12, x + cw - 12)
        within = (y + 1, x + 1, y + ch - 1, x + cw - 1)
        n = int(self.rng.integers(1, self.max_defects + 1))
        if self.residuals and self.rng.random() < self.paste_share:
            image, boxes = self._paste(bg, n, region, within)
        else:
            try:
                image, boxes = simulate(bg, self.rng, n, self.config, region=region, within=within)
            except NoPartError:
                return bg.unit, np.zeros((0, 4), np.float32)
        tile = np.full((s, s), self.pad, np.float32)
        tile[:ch, :cw] = image[y : y + ch, x : x + cw]
        return tile, (boxes - np.asarray([x, y, x, y], np.float32)).reshape(-1, 4)

    def _paste(
        self, bg: Background, n: int, region: tuple[int, int, int, int], within: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        y0, x0, y1, x1 = region
        image = bg.unit.copy()
        boxes: list[tuple[float, float, float, float]] = []
        for _ in range(n * 6):
            if len(boxes) >= n:
                break
            res = self.residuals[int(self.rng.integers(len(self.residuals)))]
            cx, cy = self.rng.uniform(x0, max(x0 + 1, x1)), self.rng.uniform(y0, max(y0 + 1, y1))
            trial, box = paste(bg, res, cx, cy, self.rng, out=image.copy())
            if box is None or not _inside(box, within) or any(_boxes_overlap(box, b) for b in boxes):
                continue
            image = trial
            boxes.append(box)
        return image, np.asarray(boxes, np.float32).reshape(-1, 4)


def attach(
    sampler: TileSampler,
    images: Sequence[LoadedImage],
    share: float,
    paste_share: float,
    seed: int,
    config: SimConfig | None = None,
) -> dict[str, Any] | None:
    """Let `sampler` draw `share` of its positives from defects simulated on `images`' verified normals;
    returns the simulator's summary (None when `share` is 0).

    `images` must be the training split only: validation and test images never feed the simulator.
    `paste_share` of the simulated tiles use copy-paste of real training defects instead of physics.
    """
    if not 0 <= share <= 1 or not 0 <= paste_share <= 1:
        raise DatasetError(f"simulation shares must lie in [0, 1], got {share} and {paste_share}")
    if share == 0:
        return None
    normals = [(im.name, im.unit) for im in images if im.annotated and im.label is False and not len(im.boxes)]
    defective = [(im.name, im.unit, im.boxes) for im in images if im.annotated and len(im.boxes)]
    # Its own random stream: the sampler's stays as it was, apart from the one draw per positive.
    rng = np.random.default_rng([seed, 7919])
    tiles = SimulatedTiles(
        normals, sampler.size, sampler.pad, rng, defective=defective, paste_share=paste_share, config=config
    )
    sampler.extra_positives, sampler.extra_share = tiles, share
    return tiles.summary()
