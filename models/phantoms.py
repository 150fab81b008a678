"""Synthetic CT phantoms in Hounsfield units, with ground truth.

Not anatomy, but the properties a triage model and the pipeline must cope with:

* head CT: air, scalp, a thick skull shell of varying thickness and density, a thin
  layer of subarachnoid CSF under the inner table, brain parenchyma with a grey/white
  pattern, deep grey nuclei, lateral and third ventricles, and optionally acute blood
  (an intraparenchymal haematoma, sometimes with an oedema rim, and/or a subdural
  crescent along the inner table) of varied size, density and position;
* chest CT: a study that must route elsewhere (body, fat, muscle, lungs, spine, ribs).

Then what a scanner adds: a small point-spread blur (so the skull has partial-volume
edges — the classic blood mimic at the inner table) and quantum noise. Head size,
shape, tilt, field of view, slice count and thickness and noise level vary from study
to study. Everything is drawn from the caller's seeded `np.random.Generator`, so a
seed reproduces a phantom exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import ndimage

AIR_HU = -1000
HU_MIN, HU_MAX = -1024, 3071  # a 12-bit CT range: what a scanner stores


@dataclass(frozen=True)
class Bleed:
    kind: str  # "intraparenchymal" or "subdural"
    volume_ml: float
    peak_hu: float


@dataclass(frozen=True)
class Phantom:
    hu: np.ndarray  # (z, y, x) int16, Hounsfield units (integer HU, as a scanner stores them)
    spacing_zyx: tuple[float, float, float]  # mm
    has_bleed: bool
    bleeds: tuple[Bleed, ...] = field(default_factory=tuple)
    bleed_slices: tuple[int, int] | None = None  # inclusive slice range holding blood
    # Voxels that are blood, (z, y, x) bool; the training's dense auxiliary target. None = no blood.
    blood_mask: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def bleed_volume_ml(self) -> float:
        return float(sum(b.volume_ml for b in self.bleeds))


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, int, int], cell_vox: tuple[float, ...]
) -> np.ndarray:
    """Zero-mean, unit-variance random field varying over about `cell_vox` voxels per axis.

    Drawn on a coarse lattice and trilinearly upsampled: the same look as a Gaussian-
    filtered white noise at a fraction of the cost (phantoms are made by the thousand
    for training).
    """
    coarse = tuple(max(2, int(np.ceil(n / c)) + 1) for n, c in zip(shape, cell_vox, strict=True))
    lattice = torch.from_numpy(rng.standard_normal(coarse).astype(np.float32))[None, None]
    up = torch.nn.functional.interpolate(lattice, size=shape, mode="trilinear", align_corners=True)
    out = up[0, 0].numpy()
    return (out - out.mean()) / (out.std() + 1e-6)


def _coords(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patient-space coordinates (z, y, x) in mm, centred on the volume, as full arrays."""
    axes = [
        ((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(shape, spacing, strict=True)
    ]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return z, y, x


def head_ct_phantom(
    rng: np.random.Generator,
    *,
    bleed: bool,
    shape: tuple[int, int, int] | None = None,
    pixel_mm: float | None = None,
    min_bleed_ml: float = 0.0,
) -> Phantom:
    """A non-contrast head CT, with acute blood if `bleed`.

    `shape` (slices, rows, cols) and `pixel_mm` fix the grid (else 24-40 slices of
    128 x 128 with a field of view fitted to the head). With `min_bleed_ml` a bleed is
    redrawn until the blood volume reaches it — for demos and tests that need an
    unmistakable bleed; training uses the full range, down to a fraction of a mL.
    """
    while True:
        ph = _head_ct_phantom(rng, bleed=bleed, shape=shape, pixel_mm=pixel_mm)
        # A bleed that the skull clipped away entirely is redrawn too: the label must be true.
        if not bleed or (ph.has_bleed and ph.bleed_volume_ml >= min_bleed_ml):
            return ph


def _head_ct_phantom(
    rng: np.random.Generator,
    *,
    bleed: bool,
    shape: tuple[int, int, int] | None,
    pixel_mm: float | None,
) -> Phantom:
    # Head semi-axes (mm): left-right, antero-posterior, cranio-caudal.
    ax, ay, az = rng.uniform(64, 76), rng.uniform(80, 92), rng.uniform(62, 74)
    scalp_mm = rng.uniform(3, 6)
    if shape is None:
        n_slices = int(rng.integers(24, 41))
        shp: tuple[int, int, int] = (n_slices, 128, 128)
    else:
        shp = (int(shape[0]), int(shape[1]), int(shape[2]))
    # Field of view fitted to the head with a varying margin, as a technologist would.
    fov = 2 * (ay + scalp_mm + 8) * rng.uniform(1.05, 1.25)
    pixel = fov / max(shp[1], shp[2]) if pixel_mm is None else float(pixel_mm)
    # Cover skull base to vertex-ish (130-165 mm) whatever the slice count.
    slice_mm = float(np.clip(round(rng.uniform(130, 165) / shp[0], 1), 2.5, 6.0))
    spacing = (slice_mm, pixel, pixel)
    z, y, x = _coords(shp, spacing)

    # Pose: shifted, turned in-plane (yaw) and tilted a little (pitch), as heads lie in a scanner.
    cx, cy, cz = rng.uniform(-6, 6), rng.uniform(-6, 6), rng.uniform(-8, 8)
    yaw, pitch = rng.uniform(-0.2, 0.2), rng.uniform(-0.12, 0.12)
    x0, y0, z0 = x - cx, y - cy, z - cz
    xr = x0 * np.cos(yaw) - y0 * np.sin(yaw)
    y1 = x0 * np.sin(yaw) + y0 * np.cos(yaw)
    yr = y1 * np.cos(pitch) - z0 * np.sin(pitch)
    zr = y1 * np.sin(pitch) + z0 * np.cos(pitch)
    del x0, y0, z0, y1
    # Normalised ellipsoidal radius: 1 at the outer table.
    r = np.sqrt((xr / ax) ** 2 + (yr / ay) ** 2 + (zr / az) ** 2)
    a_min = min(ax, ay, az)

    coarse_cells = (8.0, 16.0, 16.0)
    skull_var = _smooth_field(rng, shp, coarse_cells)
    skull_mm = rng.uniform(5, 8) * (1 + 0.2 * skull_var)  # thicker and thinner regions
    inner = 1.0 - skull_mm / a_min  # inner table, normalised
    csf_mm = rng.uniform(0.8, 3.0)  # subarachnoid space: more with age (atrophy)
    brain_edge = inner - csf_mm / a_min

    hu = np.full(shp, AIR_HU, dtype=np.float32)
    hu[r <= 1.0 + scalp_mm / a_min] = rng.uniform(15, 45)  # scalp
    skull = (r <= 1.0) & (r > inner)
    bone_level = rng.uniform(700, 1500)
    hu[skull] = (bone_level * (1 + 0.12 * _smooth_field(rng, shp, (4.0, 6.0, 6.0))))[skull]
    intracranial = r <= inner
    hu[intracranial] = rng.uniform(2, 10)  # CSF under the inner table
    brain = r <= brain_edge

    # Grey/white: white matter inside a folded boundary, grey matter (cortex) outside it,
    # plus deep grey nuclei. Grey stays below ~45 HU so acute blood remains hyperdense.
    white_hu = rng.uniform(22, 30)
    grey_hu = white_hu + rng.uniform(6, 12)
    gyri = _smooth_field(rng, shp, (3.0, 5.0, 5.0))
    rb = r / brain_edge
    white = brain & (rb + 0.07 * gyri < rng.uniform(0.72, 0.82))
    texture = rng.uniform(0.8, 2.0) * _smooth_field(rng, shp, (2.0, 3.0, 3.0))
    parenchyma = np.where(white, white_hu, grey_hu) + texture
    for side in (-1.0, 1.0):  # basal ganglia / thalami
        nuc = ((xr - side * rng.uniform(14, 20)) / 9) ** 2 + (yr / 14) ** 2 + ((zr + 5) / 12) ** 2 <= 1.0
        parenchyma[nuc] = grey_hu + texture[nuc]
    hu[brain] = parenchyma[brain]

    # Ventricles: two lateral ventricles either side of the midline, and a slit-like third.
    vent_w, vent_l, vent_h = rng.uniform(4, 9), rng.uniform(18, 30), rng.uniform(10, 18)
    csf_hu = rng.uniform(2, 10)
    for side in (-1.0, 1.0):
        vx, vy, vz = xr - side * rng.uniform(6, 10), yr + rng.uniform(-4, 4), zr - 10
        ventricle = (vx / vent_w) ** 2 + (vy / vent_l) ** 2 + (vz / vent_h) ** 2 <= 1
        hu[ventricle & brain] = csf_hu
    third = (xr / 1.6) ** 2 + (yr / 12) ** 2 + ((zr + 4) / 10) ** 2 <= 1.0
    hu[third & brain] = csf_hu

    bleeds: list[Bleed] = []
    blood = np.zeros(shp, dtype=bool)
    if bleed:
        voxel_ml = float(np.prod(spacing)) / 1000.0
        kind = rng.choice(["intraparenchymal", "subdural", "both"], p=[0.5, 0.35, 0.15])
        if kind in ("intraparenchymal", "both"):
            mask, peak = _haematoma(rng, hu, xr, yr, zr, rb, brain, shp)
            blood |= mask
            bleeds.append(Bleed("intraparenchymal", float(mask.sum() * voxel_ml), peak))
        if kind in ("subdural", "both"):
            mask, peak = _subdural(rng, hu, xr, yr, zr, r, inner, intracranial, a_min, az, shp)
            blood |= mask
            bleeds.append(Bleed("subdural", float(mask.sum() * voxel_ml), peak))

    # Scanner: point-spread blur (partial volume at every edge), then quantum noise.
    in_plane = rng.uniform(0.35, 0.7)  # voxels: a sharp-to-standard reconstruction kernel
    psf = (rng.uniform(0.2, 0.4), in_plane, in_plane)
    hu = ndimage.gaussian_filter(hu, psf)
    hu += rng.uniform(3, 8) * rng.standard_normal(shp, dtype=np.float32)
    out = np.clip(np.round(hu), HU_MIN, HU_MAX).astype(np.int16)

    has_bleed = bool(blood.any())
    slices = np.nonzero(blood.any(axis=(1, 2)))[0]
    return Phantom(
        hu=out,
        spacing_zyx=spacing,
        has_bleed=has_bleed,
        bleeds=tuple(b for b in bleeds if b.volume_ml > 0),
        bleed_slices=(int(slices[0]), int(slices[-1])) if has_bleed else None,
        blood_mask=blood if has_bleed else None,
    )


def _haematoma(
    rng: np.random.Generator,
    hu: np.ndarray,
    xr: np.ndarray,
    yr: np.ndarray,
    zr: np.ndarray,
    rb: np.ndarray,
    brain: np.ndarray,
    shp: tuple[int, int, int],
) -> tuple[np.ndarray, float]:
    """An irregular hyperdense blob in the parenchyma; drawn in place into `hu`."""
    # Log-uniform radius: many small bleeds (the hard, clinically important ones), some large.
    radius = float(np.exp(rng.uniform(np.log(3.5), np.log(18.0))))
    centre_idx = np.argwhere(brain & (rb < 0.75))
    cz_i, cy_i, cx_i = centre_idx[rng.integers(len(centre_idx))]
    pz, py, px = zr[cz_i, cy_i, cx_i], yr[cz_i, cy_i, cx_i], xr[cz_i, cy_i, cx_i]
    rx, ry, rz = radius * rng.uniform(0.7, 1.3, size=3)
    d = np.sqrt(((xr - px) / rx) ** 2 + ((yr - py) / ry) ** 2 + ((zr - pz) / rz) ** 2)
    # Lobulated edge: the radius threshold wobbles with a smooth field.
    edge = 1.0 + 0.15 * _smooth_field(rng, shp, (2.0, 3.0, 3.0))
    mask = (d <= edge) & brain
    peak = float(rng.uniform(55, 90))
    if rng.random() < 0.5:
        # Perihaematomal oedema: a hypodense rim a few mm thick.
        rim_mm = rng.uniform(1.5, 5.0)
        rim = (d <= edge * (1 + rim_mm / radius)) & brain & ~mask
        hu[rim] = rng.uniform(12, 22)
    hu[mask] = peak + 3.0 * _smooth_field(rng, shp, (2.0, 2.0, 2.0))[mask]
    return mask, peak


def _subdural(
    rng: np.random.Generator,
    hu: np.ndarray,
    xr: np.ndarray,
    yr: np.ndarray,
    zr: np.ndarray,
    r: np.ndarray,
    inner: np.ndarray,
    intracranial: np.ndarray,
    a_min: float,
    az: float,
    shp: tuple[int, int, int],
) -> tuple[np.ndarray, float]:
    """A crescent of blood along the inner table, thickest in its middle; drawn into `hu`."""
    thick_mm = rng.uniform(5, 15)
    angle = rng.uniform(0, 2 * np.pi)  # where around the head (in-plane)
    half_width = rng.uniform(0.4, 1.1)  # angular half-extent, radians
    z_centre, z_half = rng.uniform(-0.2, 0.5) * az, rng.uniform(15, 45)
    phi = np.arctan2(yr, xr)
    dphi = np.abs(np.angle(np.exp(1j * (phi - angle))))
    # Crescent profile: full thickness over most of its extent, thinning quickly at the ends
    # (the square root flattens the cosine), as blood spreads along the inner table.
    taper = np.sqrt(
        np.clip(
            np.cos(np.clip(dphi / half_width, 0, 1) * np.pi / 2)
            * np.cos(np.clip(np.abs(zr - z_centre) / z_half, 0, 1) * np.pi / 2),
            0,
            1,
        )
    )
    mask = intracranial & (r > inner - (thick_mm / a_min) * taper) & (taper > 0)
    peak = float(rng.uniform(50, 85))
    hu[mask] = peak + 3.0 * _smooth_field(rng, shp, (2.0, 3.0, 3.0))[mask]
    return mask, peak


def chest_ct_phantom(rng: np.random.Generator, *, shape: tuple[int, int, int] | None = None) -> Phantom:
    """A chest CT (body of fat and muscle, lungs, mediastinum, spine, ribs): must route elsewhere."""
    shp = (int(rng.integers(30, 41)), 128, 128) if shape is None else shape
    bx, by = rng.uniform(150, 175), rng.uniform(100, 125)
    pixel = 2 * bx * rng.uniform(1.05, 1.15) / shp[2]
    spacing = (5.0, pixel, pixel)
    z, y, x = _coords(shp, spacing)
    hu = np.full(shp, AIR_HU, dtype=np.float32)
    body = (x / bx) ** 2 + (y / by) ** 2 <= 1.0
    hu[body] = rng.uniform(-110, -80)  # subcutaneous fat
    fat_mm = rng.uniform(10, 25)
    muscle = (x / (bx - fat_mm)) ** 2 + (y / (by - fat_mm)) ** 2 <= 1.0
    hu[muscle] = rng.uniform(40, 55)
    # Ribs: short bright arcs just inside the muscle wall, a few per slice.
    ring = (x / (bx - fat_mm - 8)) ** 2 + (y / (by - fat_mm - 8)) ** 2
    rib_phase = np.cos(np.arctan2(y, x) * 9 + z / 12.0)
    hu[(np.abs(ring - 1) < 0.05) & (rib_phase > 0.6)] = rng.uniform(500, 900)
    for side in (-1.0, 1.0):
        lx, ly = (x - side * bx * 0.4) / (bx * 0.32), (y + 5) / (by * 0.62)
        lung = lx**2 + ly**2 + (z / 130) ** 2 <= 1
        hu[lung] = rng.uniform(-880, -820) + 25 * _smooth_field(rng, shp, (3.0, 4.0, 4.0))[lung]
    heart = ((x + 15) / 45) ** 2 + ((y + 10) / 40) ** 2 + (z / 70) ** 2 <= 1.0
    hu[heart] = rng.uniform(35, 50)
    spine_y = by * 0.65
    hu[((y - spine_y) / 16) ** 2 + (x / 16) ** 2 <= 1.0] = rng.uniform(250, 400)  # cancellous body
    cortex = np.abs(np.sqrt(((y - spine_y) / 16) ** 2 + (x / 16) ** 2) - 1.0) < 0.12
    hu[cortex] = rng.uniform(900, 1300)
    hu = ndimage.gaussian_filter(hu, (0.3, 0.6, 0.6))
    hu += rng.uniform(6, 14) * rng.standard_normal(shp, dtype=np.float32)
    return Phantom(
        hu=np.clip(np.round(hu), HU_MIN, HU_MAX).astype(np.int16), spacing_zyx=spacing, has_bleed=False
    )
