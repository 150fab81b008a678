"""Synthetic chest CT in Hounsfield units with lung-nodule ground truth, for the nodule model.

What makes nodule detection hard on a real chest CT is not the nodule but everything
that looks like one on a single slice: pulmonary vessels cut across (a round ~40 HU dot),
their bifurcations (a blob wider than the vessel), the heart and chest wall a nodule
may touch, and partial volume at thick slices. So the phantom has, in real HU:

* a body (subcutaneous fat ~-100, muscle 40-55, liver/soft tissue under the diaphragm),
  ribs and a vertebral column (cancellous 300-500, cortex up to ~1300);
* two lungs (-850 +- a smooth texture, denser posteriorly as in a supine patient) with
  domed bases, flattened medially by the mediastinum and the heart (35-50 HU);
* airways: trachea, carina and the main bronchi (air inside a thin soft-tissue wall);
* pulmonary vessels: a tree from each hilum, tubular, contrast-free blood ~40 HU,
  branching and thinning to ~1 mm towards the periphery (the nodule mimics);
* 0-3 nodules: solid (0-60 HU, 4-30 mm, spherical to lobulated) or ground glass
  (-650..-400 HU, 6-30 mm); most inside the parenchyma, some juxta-pleural (touching
  the chest wall) or juxta-vascular (touching a vessel);
* white noise of sd 10-30 HU; slices 1.25-2.5 mm; 256 x 256 matrices of 1.2-1.45 mm
  pixels (coarser than a clinical 0.7 mm, to keep a study near a second to generate;
  the model's grid is 2.5 mm anyway).

Ground truth per nodule: centre in array mm ((z, y, x) from the centre of voxel 0) and in
DICOM patient LPS mm as `models.dicom_writer.write_ct_series` writes the series (its
ImagePositionPatient puts the volume's centre at the LPS origin, rows along +y posterior,
columns along +x to the patient's left, slices along +z to the head), the diameter of
the sphere of the same volume, the kind, and a label volume (voxels of nodule i are i + 1).
Everything is drawn from the caller's seeded generator: a seed reproduces a study.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

AIR_HU = -1000.0
BLOOD_HU = 40.0
NODULE_KINDS = ("solid", "ground_glass")
MATRIX = 256
# Ranges the brief and the tests hold the generator to.
SOLID_HU = (0.0, 60.0)
GROUND_GLASS_HU = (-650.0, -400.0)
SOLID_DIAMETER_MM = (4.0, 30.0)
GROUND_GLASS_DIAMETER_MM = (6.0, 30.0)
NOISE_SD_HU = (10.0, 30.0)
SLICE_MM = (1.25, 2.5)
PIXEL_MM = (1.2, 1.45)
# Vessels end where they are this thin (radius, mm): ~1 mm calibre at the periphery.
VESSEL_MIN_RADIUS_MM = 0.5


@dataclass(frozen=True)
class Nodule:
    kind: str  # "solid" or "ground_glass"
    diameter_mm: float  # of the sphere with the nodule's volume
    hu: float  # attenuation of its core
    centre_zyx_mm: tuple[float, float, float]  # array mm from the centre of voxel (0, 0, 0)
    centre_lps_mm: tuple[float, float, float]  # DICOM patient (x, y, z) as write_ct_series writes it
    site: str  # "parenchymal", "juxta_pleural" or "juxta_vascular"
    label: int  # its voxels in ChestCtPhantom.labels


@dataclass(frozen=True)
class ChestCtPhantom:
    hu: np.ndarray  # (z, y, x) int16 HU
    spacing_zyx: tuple[float, float, float]
    nodules: tuple[Nodule, ...]
    # (z, y, x) uint8: 0 = no nodule, i + 1 = nodules[i] (a voxel at least half inside it).
    labels: np.ndarray = field(repr=False, compare=False)
    noise_sd: float = 0.0

    @property
    def has_nodule(self) -> bool:
        return bool(self.nodules)

    def mask(self, nodule: Nodule | None = None) -> np.ndarray:
        """Voxels of one nodule, or of all when `nodule` is None."""
        return self.labels > 0 if nodule is None else self.labels == nodule.label


def lps_of_index(index_zyx: np.ndarray, shape: tuple[int, ...], spacing_zyx: tuple[float, ...]) -> np.ndarray:
    """Patient (x, y, z) mm of continuous array indices (..., 3 as z, y, x) for a series
    written by `write_ct_series`: its origin is -(n - 1) * spacing / 2 on every axis."""
    idx = np.asarray(index_zyx, dtype=np.float64)
    centred = (idx - (np.asarray(shape[:3], dtype=np.float64) - 1) / 2) * np.asarray(spacing_zyx)
    return centred[..., ::-1]


@dataclass(frozen=True)
class _Anatomy:
    """The analytic shapes (centred mm), kept to place vessels and nodules inside the lungs."""

    body_ax: float
    body_ay: float
    wall: float
    mediastinum: float
    lungs: tuple[tuple[float, float, float, float, float, float, float, float], ...]
    # per lung: cx, cy, cz, ax, ay, az, dome base z, dome height
    heart: tuple[float, float, float, float, float, float]  # cx, cy, cz, ax, ay, az
    spine: tuple[float, float]  # cy, radius

    def depth_at(self, p: np.ndarray) -> float:
        """`depth` of one point, in plain floats (called thousands of times per study)."""
        x, y, z = float(p[0]), float(p[1]), float(p[2])
        best = -1e3
        hx, hy, hz, hax, hay, haz = self.heart
        rh = math.sqrt(((x - hx) / hax) ** 2 + ((y - hy) / hay) ** 2 + ((z - hz) / haz) ** 2)
        d_heart = (rh - 1) * min(hax, hay, haz)
        inner = math.sqrt((x / (self.body_ax - self.wall)) ** 2 + (y / (self.body_ay - self.wall)) ** 2)
        d_wall = (1 - inner) * (self.body_ay - self.wall)
        d_spine = math.sqrt(x**2 + (y - self.spine[0]) ** 2) - self.spine[1] - 12.0
        for side, (cx, cy, cz, ax, ay, az, dome_z, dome_h) in zip((-1, 1), self.lungs, strict=True):
            ux, uy = (x - cx) / ax, (y - cy) / ay
            rho = math.sqrt(ux * ux + uy * uy + ((z - cz) / az) ** 2)
            dome = dome_z + dome_h * (1 - ux * ux - uy * uy)
            d = min((1 - rho) * min(ax, ay, az), (z - dome) * 0.8, side * x - self.mediastinum)
            best = max(best, min(d, d_wall, d_heart, d_spine))
        return best

    def depth(self, p: np.ndarray) -> np.ndarray:
        """Approximate distance (mm) of points (..., 3 as x, y, z) inside the lungs to the
        lung boundary; negative outside. An approximation (ellipsoids are not distance
        fields) good to a few mm, which is all the placement needs."""
        x, y, z = p[..., 0], p[..., 1], p[..., 2]
        best = np.full(x.shape, -1e3)
        for side, (cx, cy, cz, ax, ay, az, dome_z, dome_h) in zip((-1, 1), self.lungs, strict=True):
            rho = np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2)
            d = (1 - rho) * min(ax, ay, az)
            dome = dome_z + dome_h * (1 - ((x - cx) / ax) ** 2 - ((y - cy) / ay) ** 2)
            d = np.minimum(d, (z - dome) * 0.8)
            d = np.minimum(d, side * x - self.mediastinum)
            inner = np.sqrt((x / (self.body_ax - self.wall)) ** 2 + (y / (self.body_ay - self.wall)) ** 2)
            d = np.minimum(d, (1 - inner) * (self.body_ay - self.wall))
            hx, hy, hz, hax, hay, haz = self.heart
            rh = np.sqrt(((x - hx) / hax) ** 2 + ((y - hy) / hay) ** 2 + ((z - hz) / haz) ** 2)
            d = np.minimum(d, (rh - 1) * min(hax, hay, haz))
            cy_sp, r_sp = self.spine
            d = np.minimum(d, np.sqrt(x**2 + (y - cy_sp) ** 2) - r_sp - 12.0)
            best = np.maximum(best, d)
        return best


def _smooth_noise(
    rng: np.random.Generator, shape: tuple[int, int, int], cells: tuple[int, int, int]
) -> np.ndarray:
    """Unit-sd random field varying over ~shape / cells voxels: a coarse lattice upsampled."""
    coarse = torch.from_numpy(rng.standard_normal(cells).astype(np.float32))[None, None]
    up = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)
    out = up[0, 0].numpy()
    return out / max(float(out.std()), 1e-6)


def _rotate(v: np.ndarray, angle: float, rng: np.random.Generator) -> np.ndarray:
    """`v` turned by `angle` about a random axis perpendicular to it."""
    a = rng.standard_normal(3)
    a -= a.dot(v) * v
    a /= np.linalg.norm(a) + 1e-9
    out = v * math.cos(angle) + np.cross(a, v) * math.sin(angle)
    return out / np.linalg.norm(out)


class _Canvas:
    """A volume plus its centred-mm coordinates, drawing shapes within their bounding boxes
    only (a study holds ~1000 vessel segments: full-volume passes would cost minutes)."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> None:
        self.shape = shape
        self.spacing = np.asarray(spacing)
        self.half = (np.asarray(shape) - 1) / 2
        self.voxel = float(np.prod(spacing) ** (1 / 3))

    def box(self, lo_xyz: np.ndarray, hi_xyz: np.ndarray) -> tuple[slice, slice, slice] | None:
        lo = np.floor(lo_xyz[::-1] / self.spacing + self.half).astype(int)
        hi = np.ceil(hi_xyz[::-1] / self.spacing + self.half).astype(int) + 1
        lo, hi = np.maximum(lo, 0), np.minimum(hi, self.shape)
        if np.any(hi <= lo):
            return None
        return (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))

    def points(self, box: tuple[slice, slice, slice]) -> np.ndarray:
        """(dz, dy, dx, 3) centred-mm (x, y, z) coordinates of the voxels of `box`."""
        axes = [(np.arange(s.start, s.stop) - self.half[a]) * self.spacing[a] for a, s in enumerate(box)]
        z, y, x = np.meshgrid(*axes, indexing="ij")
        return np.stack([x, y, z], axis=-1)


def _segment(
    canvas: _Canvas, hu: np.ndarray, p0: np.ndarray, p1: np.ndarray, r0: float, r1: float, value: float
) -> None:
    """A tapered capsule from p0 (radius r0) to p1 (r1) of `value` HU blended into `hu` by
    its partial-volume occupancy (within its bounding box only). Blending a vessel into a
    vessel of the same HU leaves it unchanged, so branches overlap at forks seamlessly."""
    r = max(r0, r1) + canvas.voxel
    box = canvas.box(np.minimum(p0, p1) - r, np.maximum(p0, p1) + r)
    if box is None:
        return
    q = canvas.points(box)
    d = p1 - p0
    length2 = float(d.dot(d)) + 1e-9
    t = np.clip(((q - p0) @ d) / length2, 0.0, 1.0)
    dist = np.linalg.norm(q - (p0 + t[..., None] * d), axis=-1)
    radius = r0 + (r1 - r0) * t
    o = np.clip((radius - dist) / canvas.voxel + 0.5, 0.0, 1.0).astype(np.float32)
    region = hu[box]
    region += o * (np.float32(value) - region)


def _vessel_tree(
    canvas: _Canvas,
    hu: np.ndarray,
    anatomy: _Anatomy,
    rng: np.random.Generator,
    side: int,
    hilum: np.ndarray,
    blood: float,
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Draw one lung's vessels; returns the segments (start, end, radius) for juxta-vascular
    nodule placement. Trunks leave the hilum up, down, forwards and back; each segment
    forks in two thinner, shorter, turned branches until the calibre is ~1 mm or the
    branch would leave the lung."""
    segments: list[tuple[np.ndarray, np.ndarray, float]] = []
    trunks = [(0.45, 0.0, 0.9), (0.6, -0.5, -0.6), (0.6, 0.55, -0.6), (0.9, 0.1, -0.3), (0.7, -0.6, 0.35)]
    stack: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    for tx, ty, tz in trunks:
        v = np.array([side * tx, ty, tz]) + rng.normal(0, 0.12, 3)
        stack.append((hilum.copy(), v / np.linalg.norm(v), rng.uniform(4.0, 5.5), rng.uniform(22, 32)))
    while stack:
        p0, v, r, length = stack.pop()
        p1 = p0 + v * length
        # Shorten a branch that would leave the lung; drop it if even a stub would.
        for _ in range(3):
            if anatomy.depth_at(p1) > r + 1.0:
                break
            length *= 0.5
            p1 = p0 + v * length
        else:
            continue
        r_end = r * 0.9
        _segment(canvas, hu, p0, p1, r, r_end, blood)
        segments.append((p0, p1, r))
        for _ in range(2):
            rc = r * rng.uniform(0.66, 0.8)
            if rc < VESSEL_MIN_RADIUS_MM:
                continue
            vc = _rotate(v, math.radians(rng.uniform(20, 42)), rng)
            stack.append((p1, vc, rc, max(length * rng.uniform(0.72, 0.9), 7.0)))
    return segments


def _nodule(
    canvas: _Canvas,
    hu: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    centre: np.ndarray,
    radius: float,
    value: float,
    label: int,
) -> float:
    """A (possibly lobulated) nodule blended into `hu` with partial volume; returns its
    volume in mm3 (from the partial-volume occupancy)."""
    lobulation = rng.uniform(0.0, 0.22)
    axes = rng.standard_normal((3, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    weights = rng.uniform(-1, 1, 3)
    freq = int(rng.integers(2, 5))
    phase = rng.uniform(0, 2 * math.pi)
    reach = radius * (1 + 2 * lobulation) + canvas.voxel
    box = canvas.box(centre - reach, centre + reach)
    if box is None:
        return 0.0
    q = canvas.points(box) - centre
    dist = np.linalg.norm(q, axis=-1)
    n = q / np.maximum(dist, 1e-6)[..., None]
    # Smooth bumps (quadrupoles about random axes) and finer lobes around the first axis.
    bump = sum(w * (3 * (n @ a) ** 2 - 1) / 2 for w, a in zip(weights, axes, strict=True))
    lobes = np.cos(freq * np.arctan2(n @ axes[1], n @ axes[2]) + phase) * (1 - (n @ axes[0]) ** 2)
    r_eff = radius * (1 + lobulation * (0.6 * bump + 0.4 * lobes))
    o = np.clip((r_eff - dist) / canvas.voxel + 0.5, 0.0, 1.0).astype(np.float32)
    region = hu[box]
    region += o * (value - region)
    labels[box][o >= 0.5] = label
    return float(o.sum() * np.prod(canvas.spacing))


def chest_ct_phantom(
    rng: np.random.Generator,
    *,
    nodules: int | None = None,
    kinds: tuple[str, ...] | None = None,
    min_diameter_mm: float | None = None,
) -> ChestCtPhantom:
    """One chest CT. `nodules`: how many (0-3; None draws 0-3 with a quarter each);
    `kinds`: their kinds in order (default: ~70 % solid); `min_diameter_mm`: raise the
    lower end of the size range (a demo or test case the size the model is meant to
    find; the draws are the same, so None changes nothing the training sets saw)."""
    n_nodules = int(rng.integers(0, 4)) if nodules is None else nodules
    if not 0 <= n_nodules <= 3:
        raise ValueError(f"0-3 nodules per study, got {n_nodules}")
    if kinds is not None and (len(kinds) != n_nodules or any(k not in NODULE_KINDS for k in kinds)):
        raise ValueError(f"kinds must be {n_nodules} of {NODULE_KINDS}, got {kinds}")

    bx, by = rng.uniform(145, 170), rng.uniform(100, 122)
    pixel = float(rng.uniform(*PIXEL_MM))
    pixel = max(pixel, 2 * bx * 1.06 / MATRIX)
    dz = float(rng.choice([1.25, 1.5, 2.0, 2.5]))
    wall = rng.uniform(22, 34)
    mediastinum = rng.uniform(14, 22)
    az = rng.uniform(90, 112)
    n_slices = math.ceil((2 * az + 30) / dz)
    shape = (n_slices, MATRIX, MATRIX)
    spacing = (dz, pixel, pixel)
    canvas = _Canvas(shape, spacing)
    z = ((np.arange(shape[0]) - canvas.half[0]) * dz).astype(np.float32)[:, None, None]
    y = ((np.arange(shape[1]) - canvas.half[1]) * pixel).astype(np.float32)[None, :, None]
    x = ((np.arange(shape[2]) - canvas.half[2]) * pixel).astype(np.float32)[None, None, :]
    cz = float(rng.uniform(-8, 8))

    # Body: fat, then muscle inside the fat layer.
    rho_body = np.sqrt((x / bx) ** 2 + (y / by) ** 2)  # (1, y, x)
    fat_mm = rng.uniform(8, 22)
    hu2d = np.where(rho_body <= 1, rng.uniform(-115, -85), AIR_HU).astype(np.float32)
    hu2d = np.where(rho_body <= 1 - fat_mm / by, rng.uniform(40, 55), hu2d)
    hu = np.broadcast_to(hu2d, shape).copy()

    # Lungs.
    lungs = []
    for side in (-1, 1):
        ax = (bx - wall - mediastinum) / 2 * rng.uniform(0.92, 1.02)
        cx = side * (mediastinum + ax * 0.98)
        ay = (by * math.sqrt(max(1 - (cx / bx) ** 2, 0.3)) - wall) * rng.uniform(1.0, 1.15)
        cy = rng.uniform(0, 10)
        lz = az * rng.uniform(0.95, 1.0)
        dome_h = rng.uniform(25, 45)
        dome_z = cz - lz * 0.72 + (12.0 if side == -1 else 0.0)  # the liver lifts the right dome
        lungs.append((cx, cy, cz, ax, ay, lz, dome_z, dome_h))
    heart = (
        rng.uniform(8, 22),
        -rng.uniform(15, 30),
        cz - az * rng.uniform(0.3, 0.45),
        rng.uniform(48, 62),
        rng.uniform(40, 52),
        rng.uniform(45, 58),
    )
    spine = (by - rng.uniform(40, 50), rng.uniform(15, 19))
    anatomy = _Anatomy(bx, by, wall, mediastinum, tuple(lungs), heart, spine)

    # The lungs, each within its own bounding box (full-volume passes dominate the cost).
    lung = np.zeros(shape, dtype=bool)
    inner2d = np.sqrt((x / (bx - wall)) ** 2 + (y / (by - wall)) ** 2) < 1
    hx, hy, hz, hax, hay, haz = heart
    cy_sp, r_sp = spine
    r_spine = np.sqrt(x**2 + (y - cy_sp) ** 2)  # (1, y, x)
    keep2d = inner2d & (r_spine > r_sp + 12)
    for side, (cx, cy, lcz, ax, ay, lz, dome_z, dome_h) in zip((-1, 1), lungs, strict=True):
        box = canvas.box(np.array([cx - ax, cy - ay, lcz - lz]), np.array([cx + ax, cy + ay, lcz + lz]))
        if box is None:
            continue
        bz, by_, bx_ = z[box[0]], y[:, box[1]], x[:, :, box[2]]
        ux2, uy2 = ((bx_ - cx) / ax) ** 2, ((by_ - cy) / ay) ** 2
        inside = ux2 + uy2 + ((bz - lcz) / lz) ** 2 <= 1
        inside &= bz > dome_z + dome_h * (1 - ux2 - uy2)
        inside &= (side * bx_ > mediastinum) & keep2d[:, box[1], box[2]]
        inside &= ((bx_ - hx) / hax) ** 2 + ((by_ - hy) / hay) ** 2 + ((bz - hz) / haz) ** 2 > 1
        lung[box] |= inside

    # Heart (inside its box), then the parenchyma: -850 with a smooth texture and a supine
    # (posterior) gradient.
    hbox = canvas.box(np.array([hx - hax, hy - hay, hz - haz]), np.array([hx + hax, hy + hay, hz + haz]))
    if hbox is not None:
        heart_in = ((x[:, :, hbox[2]] - hx) / hax) ** 2 + ((y[:, hbox[1]] - hy) / hay) ** 2 + (
            (z[hbox[0]] - hz) / haz
        ) ** 2 <= 1
        hu[hbox][heart_in] = rng.uniform(35, 50)
    base = rng.uniform(-870, -830)
    texture = _smooth_noise(rng, shape, (max(shape[0] // 12, 2), 24, 24)) * rng.uniform(12, 25)
    texture += base + (y / by) * rng.uniform(15, 40)
    np.copyto(hu, texture, where=lung)

    # Spine (a column: one in-plane mask for every slice) and ribs (only the ring's pixels).
    hu[:, r_spine[0] <= r_sp] = rng.uniform(300, 500)
    hu[:, (r_spine[0] <= r_sp) & (r_spine[0] > r_sp - 2.5)] = rng.uniform(900, 1300)
    rho_in = np.sqrt((x / (bx - wall * 0.55)) ** 2 + (y / (by - wall * 0.55)) ** 2)[0]
    rows, cols = np.nonzero(
        (np.abs(rho_in - 1) * (by - wall * 0.55) < rng.uniform(3.5, 5.0)) & (np.abs(x[0]) > 25)
    )
    rib_pitch = rng.uniform(22, 28)
    # Ribs run down from the spine to the front: their z drops with the angle from the back.
    angle = np.arctan2(np.abs(x[0, 0, cols]), -(y[0, rows, 0] - cy_sp))  # 0 at the back, pi in front
    drop = (angle / math.pi) * rng.uniform(25, 40)
    rib_phase = np.mod(z[:, :, 0] + drop[None] - cz + rng.uniform(0, rib_pitch), rib_pitch)
    ks, ps = np.nonzero(np.abs(rib_phase - rib_pitch / 2) < rng.uniform(3.5, 5.0))
    hu[ks, rows[ps], cols[ps]] = rng.uniform(600, 1000)

    # Airways: trachea to the carina, main bronchi to the hila.
    top = np.array([0.0, -8.0, float(z.max()) + 5])
    carina = np.array([0.0, -4.0, cz + az * 0.35])
    r_trachea = rng.uniform(7.5, 10)
    _segment(canvas, hu, top, carina, r_trachea + 1.5, r_trachea + 1.5, 45.0)
    _segment(canvas, hu, top, carina, r_trachea, r_trachea, AIR_HU)
    hila = []
    for side in (-1, 1):
        hilum = np.array(
            [side * (mediastinum + rng.uniform(8, 14)), rng.uniform(-2, 6), cz + az * rng.uniform(0.12, 0.2)]
        )
        hila.append(hilum)
        r_b = rng.uniform(5, 6.5)
        _segment(canvas, hu, carina, hilum, r_b + 1.2, r_b + 1.0, 45.0)
        _segment(canvas, hu, carina, hilum, r_b, r_b * 0.9, AIR_HU)

    # Vessels: contrast-free blood, partial volume at their edges.
    segments = []
    blood = BLOOD_HU + rng.uniform(-8, 8)
    for side, hilum in zip((-1, 1), hila, strict=True):
        root = hilum + np.array([side * 4.0, 6.0, -6.0])
        segments += _vessel_tree(canvas, hu, anatomy, rng, side, root, blood)

    # Nodules.
    labels = np.zeros(shape, dtype=np.uint8)
    placed: list[Nodule] = []
    centres: list[tuple[np.ndarray, float]] = []
    for i in range(n_nodules):
        kind = kinds[i] if kinds is not None else ("solid" if rng.random() < 0.7 else "ground_glass")
        lo, hi = SOLID_DIAMETER_MM if kind == "solid" else GROUND_GLASS_DIAMETER_MM
        if min_diameter_mm is not None:
            lo = min(max(lo, min_diameter_mm), hi)
        diameter = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        radius = diameter / 2
        value = float(rng.uniform(*(SOLID_HU if kind == "solid" else GROUND_GLASS_HU)))
        site = str(rng.choice(["parenchymal", "juxta_pleural", "juxta_vascular"], p=[0.7, 0.15, 0.15]))
        centre = None
        for _attempt in range(400):
            if site == "juxta_vascular" and segments:
                p0, p1, r_v = segments[int(rng.integers(len(segments)))]
                if r_v < 1.0:
                    continue
                on = p0 + rng.uniform(0.2, 0.8) * (p1 - p0)
                off = _rotate((p1 - p0) / (np.linalg.norm(p1 - p0) + 1e-9), math.pi / 2, rng)
                cand = on + off * (radius + r_v * 0.8)
                ok = anatomy.depth_at(cand) > radius + 2
            else:
                side_lung = lungs[int(rng.integers(2))]
                cx, cy, lcz, ax, ay, lz = side_lung[:6]
                cand = np.array([cx, cy, lcz]) + rng.uniform(-1, 1, 3) * np.array([ax, ay, lz])
                depth = anatomy.depth_at(cand)
                ok = (
                    radius * 0.75 <= depth <= radius * 1.05 if site == "juxta_pleural" else depth > radius + 4
                )
            if ok and all(np.linalg.norm(cand - c) > radius + r + 6 for c, r in centres):
                centre = cand
                break
        if centre is None:  # a big nodule in a small lung: take the deepest point tried
            site = "parenchymal"
            cands = np.array([lungs[i % 2][:3]]) + rng.uniform(-0.6, 0.6, (200, 3)) * np.array(
                [lungs[i % 2][3:6]]
            )
            cands = np.stack(
                [c for c in cands if all(np.linalg.norm(c - q) > radius + r + 6 for q, r in centres)]
                or list(cands)
            )
            centre = cands[int(np.argmax(anatomy.depth(cands)))]
        centres.append((centre, radius))
        volume = _nodule(canvas, hu, labels, rng, centre, radius, value, i + 1)
        idx_zyx = centre[::-1] / canvas.spacing + canvas.half
        placed.append(
            Nodule(
                kind=kind,
                diameter_mm=round(float((6 * volume / math.pi) ** (1 / 3)), 3),
                hu=round(value, 1),
                centre_zyx_mm=tuple(float(v) for v in idx_zyx * canvas.spacing),  # type: ignore[arg-type]
                centre_lps_mm=tuple(float(v) for v in centre),  # type: ignore[arg-type]
                site=site,
                label=i + 1,
            )
        )

    noise_sd = float(rng.uniform(*NOISE_SD_HU))
    hu += rng.standard_normal(shape, dtype=np.float32) * noise_sd
    out = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return ChestCtPhantom(out, spacing, tuple(placed), labels, noise_sd)
