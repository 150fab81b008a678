"""Synthetic CT phantoms in Hounsfield units, with ground truth.

Not anatomy, but the properties a triage model and the pipeline must cope with:
a bright skull shell, brain parenchyma with grey/white texture and noise, CSF
ventricles, and optional hyperdense acute blood (an intraparenchymal haematoma
and/or a subdural crescent along the inner table) of varied size, contrast and
position. Head size, shape, tilt, slice count and noise vary from study to study.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

AIR_HU = -1000.0


@dataclass(frozen=True)
class Bleed:
    kind: str  # "intraparenchymal" or "subdural"
    volume_ml: float
    peak_hu: float


@dataclass(frozen=True)
class Phantom:
    hu: np.ndarray  # (z, y, x) float32, Hounsfield units
    spacing_zyx: tuple[float, float, float]  # mm
    has_bleed: bool
    bleeds: tuple[Bleed, ...] = field(default_factory=tuple)
    bleed_slices: tuple[int, int] | None = None  # inclusive slice range holding blood


def _grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """Patient-space coordinates in mm, centred on the volume."""
    return tuple(
        ((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32)[
            tuple(slice(None) if i == axis else np.newaxis for i in range(3))
        ]
        for axis, (n, s) in enumerate(zip(shape, spacing, strict=True))
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return noise / (noise.std() + 1e-6)


def head_ct_phantom(
    rng: np.random.Generator,
    *,
    bleed: bool,
    shape: tuple[int, int, int] | None = None,
    pixel_mm: float | None = None,
    min_bleed_ml: float = 0.0,
) -> Phantom:
    """A head CT; with `min_bleed_ml`, redrawn until the blood volume reaches it (demos and
    tests that need an unmistakable bleed; training uses the full range)."""
    while True:
        ph = _head_ct_phantom(rng, bleed=bleed, shape=shape, pixel_mm=pixel_mm)
        if not bleed or sum(b.volume_ml for b in ph.bleeds) >= min_bleed_ml:
            return ph


def _head_ct_phantom(
    rng: np.random.Generator,
    *,
    bleed: bool,
    shape: tuple[int, int, int] | None,
    pixel_mm: float | None,
) -> Phantom:
    n_slices = int(rng.integers(24, 33)) if shape is None else shape[0]
    rows = 128 if shape is None else shape[1]
    slice_mm = float(rng.choice([4.0, 5.0]))
    pixel = float(rng.uniform(1.6, 1.9)) if pixel_mm is None else pixel_mm
    shp = (n_slices, rows, rows) if shape is None else shape
    spacing = (slice_mm, pixel, pixel)
    z, y, x = _grid(shp, spacing)

    # Head: an ellipsoid, a little rotated in-plane and shifted.
    ax, ay, az = rng.uniform(66, 78), rng.uniform(82, 96), rng.uniform(62, 74)
    theta = rng.uniform(-0.15, 0.15)
    cx, cy, cz = rng.uniform(-6, 6), rng.uniform(-6, 6), rng.uniform(-8, 8)
    xr = (x - cx) * np.cos(theta) - (y - cy) * np.sin(theta)
    yr = (x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
    zr = z - cz
    r_outer = np.sqrt((xr / ax) ** 2 + (yr / ay) ** 2 + (zr / az) ** 2)
    skull_mm = rng.uniform(5, 8)
    inner_scale = 1.0 - skull_mm / min(ax, ay)
    scalp_scale = 1.0 + rng.uniform(3, 6) / min(ax, ay)

    hu = np.full(shp, AIR_HU, dtype=np.float32)
    hu[r_outer <= scalp_scale] = rng.uniform(10, 40)  # scalp soft tissue
    skull = r_outer <= 1.0
    hu[skull] = rng.uniform(700, 1400) + 150 * _smooth_noise(rng, shp, 2.0)[skull]
    brain = r_outer <= inner_scale
    # Grey/white texture: smooth low-frequency variation around a parenchyma level.
    parenchyma = rng.uniform(28, 38) + rng.uniform(2, 5) * _smooth_noise(rng, shp, 3.0)
    hu[brain] = parenchyma[brain]

    # Lateral ventricles: two small ellipsoids of CSF either side of the midline.
    vent_w, vent_l, vent_h = rng.uniform(5, 9), rng.uniform(18, 28), rng.uniform(12, 20)
    for side in (-1.0, 1.0):
        vx = xr - side * rng.uniform(7, 11)
        ventricle = (vx / vent_w) ** 2 + (yr / vent_l) ** 2 + ((zr - 8) / vent_h) ** 2 <= 1.0
        hu[ventricle & brain] = rng.uniform(2, 10)

    bleeds: list[Bleed] = []
    blood_mask = np.zeros(shp, dtype=bool)
    if bleed:
        kinds = rng.choice(["intraparenchymal", "subdural", "both"], p=[0.5, 0.35, 0.15])
        voxel_ml = float(np.prod(spacing)) / 1000.0
        if kinds in ("intraparenchymal", "both"):
            radius = rng.uniform(4, 16)
            # Somewhere inside the brain, away from the skull.
            while True:
                p = rng.uniform(-0.6, 0.6, size=3) * np.array([ax, ay, az]) * inner_scale
                if np.sum((p / (np.array([ax, ay, az]) * inner_scale)) ** 2) < 0.45:
                    break
            rx, ry, rz = radius * rng.uniform(0.7, 1.3, size=3)
            blob = ((xr - p[0]) / rx) ** 2 + ((yr - p[1]) / ry) ** 2 + ((zr - p[2]) / rz) ** 2 <= 1.0
            blob &= brain
            peak = rng.uniform(55, 85)
            hu[blob] = peak + 3 * _smooth_noise(rng, shp, 1.0)[blob]
            blood_mask |= blob
            bleeds.append(Bleed("intraparenchymal", float(blob.sum() * voxel_ml), float(peak)))
        if kinds in ("subdural", "both"):
            thickness = rng.uniform(3, 10) / min(ax, ay)
            angle = rng.uniform(0, 2 * np.pi)
            half_width = rng.uniform(0.5, 1.1)
            z_centre, z_half = rng.uniform(-0.3, 0.5) * az, rng.uniform(15, 35)
            phi = np.arctan2(yr, xr)
            dphi = np.abs(np.angle(np.exp(1j * (phi - angle))))
            crescent = (r_outer <= inner_scale) & (
                r_outer > inner_scale - thickness * np.cos(np.clip(dphi / half_width, 0, np.pi / 2))
            )
            crescent &= (dphi < half_width) & (np.abs(zr - z_centre) < z_half)
            peak = rng.uniform(50, 80)
            hu[crescent] = peak + 3 * _smooth_noise(rng, shp, 1.0)[crescent]
            blood_mask |= crescent
            bleeds.append(Bleed("subdural", float(crescent.sum() * voxel_ml), float(peak)))

    hu += rng.uniform(3, 8) * rng.standard_normal(shp).astype(np.float32)
    hu = np.clip(hu, -1024, 3071).astype(np.float32)
    slices = np.nonzero(blood_mask.any(axis=(1, 2)))[0]
    has_bleed = bool(blood_mask.any())
    return Phantom(
        hu=hu,
        spacing_zyx=spacing,
        has_bleed=has_bleed,
        bleeds=tuple(bleeds) if has_bleed else (),
        bleed_slices=(int(slices[0]), int(slices[-1])) if has_bleed else None,
    )


def chest_ct_phantom(rng: np.random.Generator) -> Phantom:
    """A chest CT: body ellipse of fat and muscle, two lungs, a spine; for routing tests."""
    shp = (int(rng.integers(30, 41)), 128, 128)
    spacing = (5.0, 2.8, 2.8)
    z, y, x = _grid(shp, spacing)
    hu = np.full(shp, AIR_HU, dtype=np.float32)
    body = (x / rng.uniform(150, 170)) ** 2 + (y / rng.uniform(100, 120)) ** 2 <= 1.0
    body = np.broadcast_to(body, shp)
    hu[body] = -90  # subcutaneous fat
    muscle = np.broadcast_to((x / 140) ** 2 + (y / 92) ** 2 <= 1.0, shp)
    hu[muscle] = 45
    for side in (-1.0, 1.0):
        lung = ((x - side * 60) / 48) ** 2 + ((y + 5) / 70) ** 2 + (z / 110) ** 2 <= 1.0
        hu[lung] = -850
    spine = np.broadcast_to(((y - 70) / 16) ** 2 + (x / 16) ** 2 <= 1.0, shp)
    hu[spine] = 700
    hu += rng.uniform(5, 12) * rng.standard_normal(shp).astype(np.float32)
    return Phantom(hu=np.clip(hu, -1024, 3071).astype(np.float32), spacing_zyx=spacing, has_bleed=False)
